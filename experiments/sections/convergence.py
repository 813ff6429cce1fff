"""Figure 6: does coordinate-wise clipping speed up training? Every (algorithm, clipped
variant) pair of Table 3, each member tuned the same way, decided on held-out seeds.

Protocol (Appendix B.4 says only "we manually tune the learning rate to find the best
learning rate"; the rest is ours, fixed before any run):

* Rates lie on one log lattice, 2^j. A coarse scan (every third lattice point, ``coarse``
  points around Table 3's rate) on the first tuning seed finds each member's region; a fine
  scan (every lattice point, the coarse best ± 2) on every tuning seed picks the rate whose
  final loss, averaged over the tuning seeds, is lowest. Where that best sits at the fine
  window's edge the window moves once more.
* A member's optimum is bracketed when two fine points lie on each side of it, a rate below
  it barely moves (its loss falls by less than 10% of the best rate's fall) and a rate above
  it diverges (non-finite, or ending above its start). An unbracketed optimum is reported as
  such and makes its pair inconclusive.
* Each member is then trained at its tuned rate on the evaluation seeds (other seeds: other
  training subsets and batch orders), and so is the control: the unclipped optimizer at the
  clipped member's tuned rate (is a gain the clip's, or the rate's?).
* Scores, per pair and evaluation seed, paired: the final loss (the last epoch's mean
  training loss, as the paper's code logs it) and the steps to reach the target, the
  unclipped member's mean final loss. Each with a 90% bootstrap interval of its mean over
  the evaluation seeds.

All runs of one member at one stage are one compiled program (`experiments.training.sweep`).
"""

from __future__ import annotations

import functools
import math

import matplotlib.cm as cm
import numpy as np

from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import bootstrap_interval, write_table
from experiments.paper.claims import verdict
from experiments.presets import TABLE3_LEARNING_RATES
from experiments.setup.experiment import Experiment, records_of
from experiments.training import loop, sweep
from experiments.training.variants import Variant

NAME = "convergence"
COARSE_SPACING = 3  # lattice steps between coarse points (a factor 8)
FINE_HALF_WIDTH = 2  # fine points on each side of the best (a factor 2 apart)
MAX_MOVES = 2  # times the fine window may re-centre on a new best
BARELY_MOVES = 0.1  # a rate "barely moves" when its loss falls by < 10% of the best's fall
LEVEL = 0.9  # the bootstrap intervals' coverage
RULE = ("per pair, d = (unclipped member's final loss − clipped member's), each at its rate "
        "tuned on the tuning seeds, paired over the evaluation seeds, with a 90% bootstrap "
        "interval of its mean: reproduced if the interval lies above 0, not reproduced if it "
        "lies below 0, inconclusive otherwise or when either member's optimum is unbracketed")
# The pairs of Table 3: every variant with a clipped gradient and its unclipped algorithm.
PAIRS = {task: [(v.unclipped, v) for v in rates if v.clipped and v.unclipped in rates]
         for task, rates in TABLE3_LEARNING_RATES.items()}


def lattice_rate(j: int) -> float:
  return float(2.0 ** j)


def _anchor(task: str, variant: Variant) -> int:
  """The lattice point nearest Table 3's rate of the pair's unclipped member (where that is
  Adafactor's relative step, its clipped member's): both members scan the same points."""
  rates = TABLE3_LEARNING_RATES[task]
  pair = [variant.unclipped] + [v for v in rates if v.clipped and v.unclipped == variant.unclipped]
  rate = next(rates[v] for v in pair if rates[v] is not None)
  return int(round(math.log2(rate)))


def _programs(task, variant: Variant, mesh=None):
  """One compiled sweep per (model, variant): the learning rate lives in the state."""
  return _compiled(task.model, variant, task.preset.microbatch_size, task.preset.remat, mesh)


@functools.lru_cache(maxsize=None)
def _compiled(model, variant: Variant, microbatch_size: int, remat: str, mesh):
  return sweep.programs(loop.model_objective(model, mesh, "train", microbatch_size, remat),
                        variant.make(1.0, tunable=True))


def _train(ctx, task_name, variant, runs):
  """Curves of ``runs`` (`sweep.Run`s), ``convergence_copies`` at a time (the last group
  padded by repeating its last run, whose copy is dropped)."""
  preset = ctx.preset
  copies = preset.convergence_copies
  first = ctx.task(task_name, runs[0].seed)
  batch_size = preset.convergence_batch_size or first.batch_size
  compiled = _programs(first, variant, ctx.mesh)
  out = []
  for start in range(0, len(runs), copies):
    group = list(runs[start:start + copies])
    padded = group + [group[-1]] * (copies - len(group))
    curves = sweep.train_copies(compiled, lambda seed: ctx.task(task_name, seed).init_params(seed),
                                lambda seed: ctx.task(task_name, seed).train, padded,
                                epochs=preset.convergence_epochs, batch_size=batch_size)
    out += [{"learning_rate": run.learning_rate, "seed": run.seed,
             "epoch_losses": curves.epoch_losses[i], "start_loss": curves.start_loss[i],
             "final_loss": curves.final_loss[i]} for i, run in enumerate(group)]
  return out, len(next(iter(first.train.values()))) // batch_size


def _stage(ctx, task_name, variant, stage, runs, **fields):
  """The record of one stage of one member (trained now, or read back on resume)."""
  key = f"{NAME}/{task_name}/{variant.label}/{stage}"
  if not ctx.metrics.has(key):
    trained, steps_per_epoch = _train(ctx, task_name, variant, runs)
    ctx.metrics.log(NAME, key, task=task_name, algorithm=variant.label, stage=stage,
                    steps_per_epoch=steps_per_epoch, runs=trained,
                    tuning_seeds=list(ctx.preset.convergence_tuning_seeds), **fields)
  return ctx.metrics.get(key)


def last_epoch_loss(run) -> float:
  """The run's last epoch mean training loss; +inf where it diverged."""
  value = run["epoch_losses"][-1]
  return float(value) if np.isfinite(value) else math.inf


def _by_rate(records, seeds) -> dict:
  """{lattice j: mean final loss over ``seeds``} for the rates every one of them ran."""
  runs = {}
  for record in records:
    for run in record["runs"]:
      runs.setdefault(round(math.log2(run["learning_rate"])), {})[run["seed"]] = last_epoch_loss(run)
  return {j: float(np.mean([per_seed[s] for s in seeds])) for j, per_seed in runs.items()
          if all(s in per_seed for s in seeds)}


def best_of(losses: dict) -> int:
  """The lattice point with the lowest loss (the smaller rate on ties)."""
  return min(sorted(losses), key=lambda j: losses[j])


def _evaluated(records) -> set:
  """The (lattice point, seed) pairs the records ran."""
  return {(round(math.log2(run["learning_rate"])), run["seed"])
          for record in records for run in record["runs"]}


def _tune(ctx, task_name, variant) -> list:
  """The tuning scans of one member (see the module docstring); returns their records.

  The coarse scan (on the first tuning seed) grows by half its size upward where no rate
  above its best diverges, and downward where none below barely moves, once each; the fine
  window (every lattice point within FINE_HALF_WIDTH of the best, on every tuning seed)
  re-centres on the best at most MAX_MOVES times, running only the points it lacks.
  """
  preset = ctx.preset
  tuning = tuple(preset.convergence_tuning_seeds)
  anchor = _anchor(task_name, variant)
  count = preset.convergence_coarse_points
  coarse = [anchor + COARSE_SPACING * (k - count // 2) for k in range(count)]
  records = [_stage(ctx, task_name, variant, "coarse",
                    [sweep.Run(lattice_rate(j), tuning[0]) for j in coarse])]
  extra = range(1, count // 2 + 1)
  for stage, points in (("coarse-up", [max(coarse) + COARSE_SPACING * k for k in extra]),
                        ("coarse-down", [min(coarse) - COARSE_SPACING * k for k in extra])):
    ranges = range_checks(records, tuning[0])
    if not ranges["diverges above" if stage == "coarse-up" else "barely moves below"]:
      records.append(_stage(ctx, task_name, variant, stage,
                            [sweep.Run(lattice_rate(j), tuning[0]) for j in points]))
  centre = best_of(_by_rate(records, tuning[:1]))
  for move in range(MAX_MOVES + 1):
    window = range(centre - FINE_HALF_WIDTH, centre + FINE_HALF_WIDTH + 1)
    done = _evaluated(records)
    missing = [sweep.Run(lattice_rate(j), s) for s in tuning for j in window
               if (j, s) not in done]
    if missing:
      records.append(_stage(ctx, task_name, variant, f"fine{move}", missing))
    best = best_of(_by_rate(records, tuning))
    if best == centre:
      break
    centre = best
  return records


def diverged(run) -> bool:
  """Non-finite, or ending above its start (the loss on the whole training subset)."""
  return not np.isfinite(run["final_loss"]) or run["final_loss"] > run["start_loss"]


def _first_seed_runs(records, seed) -> dict:
  """{lattice j: run} of ``seed``'s runs."""
  return {round(math.log2(run["learning_rate"])): run for record in records
          for run in record["runs"] if run["seed"] == seed}


def range_checks(records, seed) -> dict:
  """Whether, around the best of ``seed``'s runs, a rate below barely moves (its loss falls
  by less than BARELY_MOVES of the best rate's fall) and a rate above diverges."""
  runs = _first_seed_runs(records, seed)
  best = best_of({j: last_epoch_loss(run) for j, run in runs.items()})
  fall = lambda run: -math.inf if diverged(run) else run["start_loss"] - run["final_loss"]
  return {"barely moves below": any(fall(run) < BARELY_MOVES * fall(runs[best])
                                    for j, run in runs.items() if j < best),
          "diverges above": any(diverged(run) for j, run in runs.items() if j > best)}


def bracketing(records, tuning) -> dict:
  """The tuned lattice point of a member and whether it is bracketed (see the module)."""
  both = _by_rate(records, tuning)
  best = best_of(both)
  first = _first_seed_runs(records, tuning[0])
  stable = [j for j, run in first.items() if not diverged(run)]
  checks = {"two below": sum(j < best for j in both) >= 2,
            "two above": sum(j > best for j in both) >= 2, **range_checks(records, tuning[0])}
  return {"best": best, "rate": lattice_rate(best), "bracketed": all(checks.values()),
          "missing": [name for name, ok in checks.items() if not ok],
          "largest_stable": lattice_rate(max(stable)) if stable else float("nan"),
          "tuned_losses": {lattice_rate(j): loss for j, loss in sorted(both.items())},
          "first_seed_losses": {lattice_rate(j): last_epoch_loss(run)
                                for j, run in sorted(first.items())}}


def run(ctx) -> None:
  preset = ctx.preset
  tuning, evaluation = (tuple(preset.convergence_tuning_seeds),
                        tuple(preset.convergence_seeds))
  for task_name, pairs in PAIRS.items():
    for unclipped, clipped in pairs:
      tuned = {v: bracketing(_tune(ctx, task_name, v), tuning)["rate"]
               for v in (unclipped, clipped)}
      # Each member at its own rate, and at its partner's: the unclipped one at the clipped
      # member's rate is the control (the clip switched off).
      for member, partner in ((unclipped, clipped), (clipped, unclipped)):
        partner_runs = ([] if tuned[partner] == tuned[member] else
                        [sweep.Run(tuned[partner], s) for s in evaluation])
        _stage(ctx, task_name, member, "evaluation",
               [sweep.Run(tuned[member], s) for s in evaluation] + partner_runs,
               own_rate=tuned[member], partner_rate=tuned[partner])


# --- the report ----------------------------------------------------------------------------

def steps_to(epoch_losses, target: float, steps_per_epoch: int) -> int:
  """Steps until an epoch's mean loss first reaches ``target``; one epoch beyond the run
  where it never does (a censored value, shown as such)."""
  for epoch, loss in enumerate(epoch_losses):
    if np.isfinite(loss) and loss <= target:
      return (epoch + 1) * steps_per_epoch
  return (len(epoch_losses) + 1) * steps_per_epoch


def status_of(low: float, high: float, bracketed: bool = True) -> str:
  """The verdict rule of one pair (see RULE)."""
  if not bracketed:
    return "inconclusive"
  return "reproduced" if low > 0 else "not reproduced" if high < 0 else "inconclusive"


def _evaluation(records, task, label):
  return next((r for r in records if r["task"] == task and r["algorithm"] == label
               and r["stage"] == "evaluation"), None)


def _at(record, rate) -> dict:
  """{seed: run} of an evaluation record's runs at ``rate``."""
  return {run["seed"]: run for run in record["runs"] if run["learning_rate"] == rate}


def pair_scores(records, task, unclipped, clipped, tuning) -> dict | None:
  """Every number the report gives for one pair."""
  tuning_records = {v: [r for r in records if r["task"] == task and r["algorithm"] == v.label
                        and r["stage"] != "evaluation"] for v in (unclipped, clipped)}
  evaluations = {v: _evaluation(records, task, v.label) for v in (unclipped, clipped)}
  if any(not tuning_records[v] for v in tuning_records) or None in evaluations.values():
    return None
  brackets = {v: bracketing(tuning_records[v], tuning) for v in (unclipped, clipped)}
  rate_u, rate_c = brackets[unclipped]["rate"], brackets[clipped]["rate"]
  own_u, own_c = _at(evaluations[unclipped], rate_u), _at(evaluations[clipped], rate_c)
  control = _at(evaluations[unclipped], rate_c)
  seeds = sorted(set(own_u) & set(own_c) & set(control))
  per_epoch = evaluations[unclipped]["steps_per_epoch"]
  final = lambda runs: np.asarray([last_epoch_loss(runs[s]) for s in seeds])
  target = float(np.mean(final(own_u)))
  steps = lambda runs: np.asarray([steps_to(runs[s]["epoch_losses"], target, per_epoch)
                                   for s in seeds], np.float64)
  difference = final(own_u) - final(own_c)
  step_gain = steps(own_u) - steps(own_c)
  clip_effect = final(control) - final(own_c)
  bracketed = brackets[unclipped]["bracketed"] and brackets[clipped]["bracketed"]
  interval = bootstrap_interval(difference, np.mean, LEVEL)
  return {"brackets": brackets, "seeds": seeds, "target": target,
          "final": {"unclipped": final(own_u), "clipped": final(own_c),
                    "control": final(control)},
          "difference": (float(np.mean(difference)), *interval),
          "step_gain": (float(np.mean(step_gain)), *bootstrap_interval(step_gain, np.mean,
                                                                        LEVEL)),
          "clip_effect": (float(np.mean(clip_effect)), *bootstrap_interval(clip_effect,
                                                                            np.mean, LEVEL)),
          "steps": {"unclipped": steps(own_u), "clipped": steps(own_c)},
          "censored": int(np.sum(steps(own_c) > per_epoch * len(
              next(iter(own_c.values()))["epoch_losses"]))),
          "curves": {name: np.asarray([runs[s]["epoch_losses"] for s in seeds], np.float64)
                     for name, runs in (("unclipped", own_u), ("clipped", own_c),
                                        ("control", control))},
          "status": status_of(*interval, bracketed), "bracketed": bracketed,
          "steps_per_epoch": per_epoch}


def _stability_figure(out, task, pairs, scores) -> str:
  """The loss-vs-rate panels (Zhao et al. 2024's stability plot): per pair, each member's
  final loss against the rate (mean over the tuning seeds; first seed only where the coarse
  scan alone ran), its tuned rate marked; diverged rates drawn at the panel's top."""
  fig, axes = new_figure(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
  for axis, (unclipped, clipped) in zip(axes[0], pairs):
    score = scores.get((unclipped.label, clipped.label))
    if score is None:
      axis.set_visible(False)
      continue
    finite = [v for v in (*score["brackets"][unclipped]["first_seed_losses"].values(),
                          *score["brackets"][clipped]["first_seed_losses"].values())
              if math.isfinite(v)]
    ceiling = max(finite) * 1.2 if finite else 1.0
    for index, member in enumerate((unclipped, clipped)):
      bracket = score["brackets"][member]
      colour = cm.tab10(index)
      for losses, style in ((bracket["first_seed_losses"], dict(marker="o", fillstyle="none",
                                                                  linestyle=":")),
                            (bracket["tuned_losses"], dict(marker="o", linestyle="-"))):
        rates = sorted(losses)
        values = [min(losses[r], ceiling) for r in rates]
        axis.plot(rates, values, color=colour, label=member.label if style["linestyle"] == "-"
                  else None, **style)
        axis.scatter([r for r in rates if not math.isfinite(losses[r]) or losses[r] > ceiling],
                     [ceiling] * sum(not math.isfinite(losses[r]) or losses[r] > ceiling
                                     for r in rates), marker="x", color=colour)
      axis.axvline(bracket["rate"], color=colour, linewidth=0.8, linestyle="--")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("final training loss")
    axis.set_title(f"{task}: {unclipped.label} vs clipped", fontsize=9)
    axis.legend(fontsize=6)
  name = f"convergence_rates_{task}"
  save_figure(fig, figure_path(out, name))
  return name


def _curves_figure(out, task, pairs, scores) -> str:
  """Figure 6: the mean training loss per epoch over the evaluation seeds at the tuned rates
  (dotted: the control, the unclipped optimizer at the clipped member's rate)."""
  fig, ax = new_figure(figsize=(6.5, 4.2))
  for index, (unclipped, clipped) in enumerate(pairs):
    score = scores.get((unclipped.label, clipped.label))
    if score is None:
      continue
    colour = cm.tab10(index)
    for name, label, style in (("unclipped", unclipped.label, "-"),
                               ("clipped", clipped.label, "--"),
                               ("control", f"{unclipped.label} at the clipped rate", ":")):
      mean = np.mean(score["curves"][name], axis=0)
      ax.plot(np.arange(1, len(mean) + 1), mean, color=colour, linestyle=style, label=label,
              alpha=0.6 if name == "control" else 1.0)
  ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("training loss (epoch mean)")
  ax.set_title(f"Convergence, {task} (Figure 6), evaluation seeds")
  ax.legend(fontsize=6, ncol=2)
  name = f"convergence_{task}"
  save_figure(fig, figure_path(out, name))
  return name


def _interval(values) -> str:
  mean, low, high = values
  return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def write(out: str, records):
  records = [r for r in records if "stage" in r]
  if not records:
    return None
  tuning = records[0]["tuning_seeds"]
  rows, tuning_rows, verdicts, figures = [], [], [], []
  for task, pairs in PAIRS.items():
    scores = {}
    for unclipped, clipped in pairs:
      score = pair_scores(records, task, unclipped, clipped, tuning)
      if score is None:
        continue
      scores[(unclipped.label, clipped.label)] = score
      for member in (unclipped, clipped):
        bracket = score["brackets"][member]
        table3 = TABLE3_LEARNING_RATES[task][member]
        tuning_rows.append([task, member.label, "relative" if table3 is None else table3,
                            bracket["rate"], "yes" if bracket["bracketed"] else
                            "no: " + ", ".join(bracket["missing"]), bracket["largest_stable"],
                            len(bracket["tuned_losses"]), len(bracket["first_seed_losses"])])
      rows.append([task, f"{unclipped.label} / {clipped.label}", len(score["seeds"]),
                   float(np.mean(score["final"]["unclipped"])),
                   float(np.mean(score["final"]["clipped"])), _interval(score["difference"]),
                   float(np.mean(score["steps"]["unclipped"])),
                   float(np.mean(score["steps"]["clipped"])), _interval(score["step_gain"]),
                   score["censored"], float(np.mean(score["final"]["control"])),
                   _interval(score["clip_effect"]), score["status"]])
      evidence = (f"d = {_interval(score['difference'])} over {len(score['seeds'])} "
                  f"evaluation seeds (final loss {np.mean(score['final']['unclipped']):.3g} "
                  f"at {score['brackets'][unclipped]['rate']:.3g} vs "
                  f"{np.mean(score['final']['clipped']):.3g} at "
                  f"{score['brackets'][clipped]['rate']:.3g}); steps to the unclipped "
                  f"member's final loss: gain {_interval(score['step_gain'])}; the clip alone "
                  f"at the clipped rate: {_interval(score['clip_effect'])}"
                  + ("" if score["bracketed"] else "; an optimum is unbracketed"))
      verdicts.append(verdict("convergence", score["status"], RULE, evidence,
                              f"{task}, {clipped.label}",
                              value=f"d {_interval(score['difference'])}",
                              paper="clipped variant faster (Figure 6)"))
    if scores:
      figures += [_stability_figure(out, task, pairs, scores),
                  _curves_figure(out, task, pairs, scores)]
  if not rows:
    return None
  tuning_table = write_table(out, "convergence_tuning",
                             ["task", "algorithm", "Table 3 lr", "tuned lr", "bracketed",
                              "largest stable lr", "rates on every tuning seed",
                              "rates on the first"], tuning_rows)
  table = write_table(out, "convergence",
                      ["task", "pair (unclipped / clipped)", "evaluation seeds",
                       "final loss, unclipped", "final loss, clipped",
                       "d = unclipped − clipped [90%]", "steps to target, unclipped",
                       "steps to target, clipped", "step gain [90%]",
                       "clipped runs that never reach it", "final loss, control",
                       "control − clipped [90%]", "verdict"], rows)
  return ("### Convergence (Figure 6), each pair tuned alike\n\n"
          "Rates on the lattice 2^j, tuned on the tuning seeds (coarse scan every 8×, then "
          "every 2× around the best), scored on the evaluation seeds; the target of the "
          "steps is the unclipped member's mean final loss; the control is the unclipped "
          "optimizer at the clipped member's rate. Rule: " + RULE + ".\n\nFigures: "
          + ", ".join(f"`figures/{f}.png`" for f in figures) + ".\n\n" + tuning_table
          + "\n\n" + table), verdicts


EXPERIMENT = Experiment(NAME, "Figure 6: each clipped/unclipped pair tuned on a rate "
                        "lattice, scored on held-out seeds", run, write, records_of(NAME),
                        ("tables/convergence[_tuning]", "figures/convergence_<task>.png",
                         "figures/convergence_rates_<task>.png"), ("translation", "code"))
