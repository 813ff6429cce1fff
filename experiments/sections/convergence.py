"""Figure 6: training-loss curves of every optimizer with and without clipping, at Table 3's
learning rates. The quick preset scans multipliers of those rates on the first seed (the
tiny models train at other scales) and records the chosen one."""

from __future__ import annotations

import functools

import matplotlib.cm as cm
import numpy as np

from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import mean_std, write_table
from experiments.paper.claims import verdict
from experiments.presets import TABLE3_LEARNING_RATES
from experiments.setup.experiment import Experiment, records_of
from experiments.training import loop
from experiments.training.variants import by_label

NAME = "convergence"
RULE = ("per (algorithm, clipped variant) pair, the final training loss (mean over seeds) at "
        "each one's chosen rate: reproduced if the clipped variant ends lower in every pair, "
        "partly if in some")
VARIANTS = by_label(v for rates in TABLE3_LEARNING_RATES.values() for v in rates)


@functools.lru_cache(maxsize=None)
def _step(model, variant, relative: bool, mesh=None):
  """One compiled step per (model, variant): the learning rate lives in the state."""
  tx = variant.make(None if relative else 1.0, tunable=True)
  return loop.train_step(loop.model_loss(model, mesh), tx)


def train_curve(task, variant, learning_rate, seed: int, epochs: int, mesh=None) -> list:
  """Mean training loss per epoch; on ``mesh`` sharded as in `optclip.sharding.placement`."""
  from optclip import sharding
  context, place, place_batch = sharding.placement(mesh)
  curve = []
  with context:
    step = _step(task.model, variant, learning_rate is None, mesh)
    state = loop.initial_state(variant.make(learning_rate, tunable=True),
                                   task.init_params(seed), place)
    loop.run_epochs(step, state, lambda epoch: task.epoch_batches(seed, epoch), epochs,
                        steps_per_epoch=task.batches_per_epoch, place_batch=place_batch,
                        on_epoch_end=lambda epoch, state, loss: curve.append(loss),
                        description=f"{task.name} {variant.label} lr={learning_rate}")
  return curve


def run(ctx) -> None:
  preset, metrics = ctx.preset, ctx.metrics
  for task_name, rates in TABLE3_LEARNING_RATES.items():
    for variant, base_rate in rates.items():
      name = variant.label
      multipliers = (1.0,) if base_rate is None else preset.convergence_lr_multipliers
      chosen_key = f"{task_name}/{name}/chosen"

      def curve_for(seed, multiplier, task):
        key = f"{task_name}/{name}/lr{multiplier:g}/seed{seed}"
        if not metrics.has(key):
          lr = None if base_rate is None else base_rate * multiplier
          metrics.log(NAME, key, task=task_name, algorithm=name, learning_rate=lr,
                      multiplier=multiplier, seed=seed,
                      curve=train_curve(task(), variant, lr, seed, preset.convergence_epochs,
                                        ctx.mesh))
        return metrics.get(key)["curve"]

      if not metrics.has(chosen_key):
        first = ctx.seeds[0]
        task = functools.lru_cache(maxsize=None)(lambda: ctx.task(task_name, first))
        finals = {}
        for m in multipliers:
          final = curve_for(first, m, task)[-1]
          finals[m] = final if np.isfinite(final) else np.inf
        best = min(finals, key=finals.get)
        metrics.log(NAME, chosen_key, task=task_name, algorithm=name, multiplier=best,
                    table3_learning_rate=base_rate, scanned=list(multipliers))
      best = metrics.get(chosen_key)["multiplier"]
      for seed in ctx.seeds[1:]:
        curve_for(seed, best, lambda seed=seed: ctx.task(task_name, seed))


def write(out: str, records):
  chosen = {(r["task"], r["algorithm"]): r for r in records if r["key"].endswith("/chosen")}
  if not chosen:
    return None
  rows, verdicts, sections = [], [], []
  for task in TABLE3_LEARNING_RATES:
    names = [n for (t, n) in chosen if t == task]
    if not names:
      continue
    fig, ax = new_figure(figsize=(6.5, 4.2))
    finals = {}
    bases = list(dict.fromkeys(VARIANTS[n].base for n in names))
    for name in names:
      pick, variant = chosen[(task, name)], VARIANTS[name]
      curves = [r["curve"] for r in records if r.get("task") == task and
                r.get("algorithm") == name and "curve" in r and
                r["multiplier"] == pick["multiplier"]]
      mean = np.mean(np.asarray(curves, np.float64), axis=0)
      finals[name] = mean[-1]
      ax.plot(np.arange(1, len(mean) + 1), mean, label=name,
              color=cm.tab10(bases.index(variant.base) % 10),
              alpha=0.45 if variant.clipped else 1.0,
              linestyle="--" if variant.clipped else "-")
      lr = pick["table3_learning_rate"]
      rows.append([task, name, "relative" if lr is None else lr, pick["multiplier"],
                   len(curves), mean[0], mean[-1], mean_std([c[-1] for c in curves])[1]])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"Convergence, {task} (Figure 6)")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, figure_path(out, f"convergence_{task}"))
    wins = [(finals[VARIANTS[n].unclipped.label], finals[n]) for n in names
            if VARIANTS[n].clipped and VARIANTS[n].unclipped.label in finals]
    if wins:
      better = sum(clipped < base for base, clipped in wins)
      status = ("reproduced" if better == len(wins) else
                "partly reproduced" if better else "not reproduced")
      verdicts.append(verdict("convergence", status, RULE,
                              f"clipped variant ends lower in {better}/{len(wins)} pairs", task))
  table = write_table(out, "convergence", ["task", "algorithm", "Table 3 lr",
                                           "lr multiplier used", "seeds",
                                           "first-epoch loss", "final loss (mean)",
                                           "final std"], rows)
  sections.append("### Convergence (Figure 6, Table 3 learning rates)\n\nThe multiplier is "
                  "the best of the preset's scan on the first seed (1 = Table 3 as published)."
                  "\n\nFigures: `figures/convergence_<task>.png`.\n\n" + table)
  return "\n\n".join(sections), verdicts


EXPERIMENT = Experiment(NAME, "Figure 6 with Table 3's learning rates", run, write,
                        records_of(NAME),
                        ("tables/convergence", "figures/convergence_<task>.png"),
                        ("translation", "code"))
