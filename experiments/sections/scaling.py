"""The scale trend (beyond the paper): the Adam/SGD and clipped/unclipped sharpness ratios and
the top-1% attribution over three model sizes per transformer task, every seed, on the SGD
trajectory (the geometry of Tables 1 and 4), at the end of the run.

Several claims are not reproduced at the quick preset's ~54K parameters; this shows whether
they emerge with size. ``python -m experiments scaling`` runs it on its own (it is not part of
``reproduce``); given the same ``--out``, ``report`` includes its section.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import probing
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import write_table
from experiments.paper import values as paper_values
from experiments.paper.claims import verdict
from experiments.probing import trajectory
from experiments.setup.experiment import Experiment

NAME = "scaling"
KIND = "scaling"
SIZES = {"translation": ("t5-micro", "t5-mini", "t5-tiny"),
         "code": ("gpt-neo-nano", "gpt-neo-mini", "gpt-neo-tiny")}
RATIOS = {"Adam / SGD": ("adam", "sgd"), "SGD clip 10% / SGD": ("sgd, clip grad 0.1", "sgd"),
          "Adam clip 50% / Adam": ("adam, clip grad 0.5", "adam")}


def _context(ctx):
  """The run's context with what the trend does not need switched off: one probe point, no
  landscape beyond x itself, no λ_max, no Hessian diagonal."""
  preset = dataclasses.replace(ctx.preset, landscape_steps=(0.0,), curvature_samples=0,
                               lanczos_iterations=0, skip_measurements=("block_sharpness",))
  return dataclasses.replace(ctx, preset=preset)


def run(ctx) -> None:
  ctx = _context(ctx)
  for task_name, sizes in SIZES.items():
    for model_name in sizes:
      task_preset = dataclasses.replace(getattr(ctx.preset, task_name), model=model_name)
      sized = dataclasses.replace(ctx, preset=dataclasses.replace(
          ctx.preset, **{task_name: task_preset}))
      for seed in ctx.seeds:
        task = sized.task(task_name, seed)
        trajectory.run(sized, task, "sgd", seed, kind=KIND, model_name=model_name,
                       probe_epochs=(sized.preset.epochs,))
        ctx.data_info.update(sized.data_info)


SHARE = "top 1% share of SGD sharpness"


def _measures(record) -> dict:
  """{measure: value} of one probe record: the ratios and the top-1% share."""
  sharp = probing.values(record)
  attribution = record["attribution"]
  share = attribution["share"][list(attribution["fractions"]).index(0.01)]
  return {**{name: sharp[a] / sharp[b] for name, (a, b) in RATIOS.items()}, SHARE: share}


def paper_value(task: str, name: str) -> float:
  """The paper's value of a measure for ``task``: the median magnitude over its Tables 4-7
  (both trajectories; its code tables hold a few negative entries), NaN where they lack the
  algorithm, or 0.5 for the top-1% share (Figure 1: "most" of the sharpness)."""
  if name == SHARE:
    return 0.5
  a, b = RATIOS[name]
  ratio = lambda label: np.asarray(paper_values.ratios_of(task, label), np.float64)
  if not ratio(a).size or not ratio(b).size:
    return float("nan")
  return float(np.median(np.abs(ratio(a) / (ratio(b) if b != "sgd" else 1.0))))


def trend(values, target: float) -> str:
  """Whether medians ordered by size approach ``target``: "toward" if every size is closer
  than the one before (in log10 of the magnitude for ratios, linearly for a share), "away"
  if every size is farther, else "mixed"."""
  def distance(value):
    if target == 0.5:  # the share
      return abs(value - target)
    return abs(np.log10(max(abs(value), 1e-300)) - np.log10(target))
  d = [distance(v) for v in values]
  steps = np.diff(d)
  if np.all(steps < 0):
    return "toward"
  if np.all(steps > 0):
    return "away"
  return "mixed"


TREND_RULE = ("per task and measure, the medians over seeds at the three sizes, smallest "
              "first: reproduced if each larger model's value is closer to the paper's (log "
              "distance for the ratios; the share against 0.5), not reproduced if each is "
              "farther, mixed otherwise")
TREND_CLAIMS = {
    "Adam / SGD": "adaptive_sharper", "SGD clip 10% / SGD": "clipping_helps",
    "Adam clip 50% / Adam": "clipping_helps", SHARE: "top_coordinates"}


def write(out: str, records):
  probes = [r for r in records if probing.is_probe(r, KIND)]
  if not probes:
    return None
  # A model's size is in its units' start records.
  sizes = {(r["task"], r["model"]): r["parameters"] for r in records
           if r["experiment"] == trajectory.EXPERIMENT and r.get("kind") == KIND
           and r["key"].endswith("/start")}
  _parameters = lambda record: sizes[(record["task"], record["model"])]
  rows, verdicts = [], []
  fig, axes = new_figure(1, len(RATIOS) + 1, figsize=(13, 3.6))
  for task in SIZES:
    sizes = sorted({(_parameters(r), r["model"]) for r in probes if r["task"] == task})
    measured = {model: [_measures(r) for r in probes if r["task"] == task
                        and r["model"] == model] for _, model in sizes}
    for count, model in sizes:
      runs = measured[model]
      rows.append([task, model, count, len(runs),
                   *[float(np.median([m[name] for m in runs])) for name in [*RATIOS, SHARE]]])
    for name in [*RATIOS, SHARE]:
      medians = [float(np.median([m[name] for m in measured[model]])) for _, model in sizes]
      target = paper_value(task, name)
      if not np.isfinite(target):  # the paper's tables of this task lack the algorithm
        continue
      direction = trend(medians, target)
      status = {"toward": "reproduced", "away": "not reproduced"}.get(direction, "mixed")
      values = " → ".join(f"{v:.3g}" for v in medians)
      verdicts.append(verdict(
          TREND_CLAIMS[name], status, TREND_RULE,
          f"{name}: {values} over {', '.join(f'{c / 1e3:.0f}K' for c, _ in sizes)} "
          f"parameters ({direction} the paper's {target:.3g})",
          f"scale trend, {task}, {name}", value=f"{values} ({direction})",
          paper=f"{target:.3g}"))
    for axis, name in zip(axes, [*RATIOS, SHARE]):
      counts = [count for count, _ in sizes]
      axis.plot(counts, [np.median([m[name] for m in measured[model]]) for _, model in sizes],
                marker="o", label=task)
      axis.scatter([count for count, model in sizes for _ in measured[model]],
                   [m[name] for _, model in sizes for m in measured[model]], s=8, alpha=0.5)
      axis.set_xscale("log")
      axis.set_xlabel("parameters")
      axis.set_title(name, fontsize=9)
  for axis in axes[:len(RATIOS)]:
    axis.set_yscale("symlog", linthresh=1e-3)
  axes[0].legend(fontsize=7)
  save_figure(fig, figure_path(out, "scaling"))
  table = write_table(out, "scaling", ["task", "model", "parameters", "seeds",
                                       *[f"{n} (median)" for n in [*RATIOS, SHARE]]], rows)
  return ("### Scale trend (beyond the paper)\n\nSGD trajectory, every seed, at the last "
          "epoch: the medians over seeds (dots: every seed). Figure: `figures/scaling.png`."
          "\n\n" + table), verdicts


EXPERIMENT = Experiment(
    NAME, "beyond the paper: sharpness ratios over three model sizes (its own command, not "
    "part of reproduce)", run, write,
    lambda r: probing.is_trajectory(r) and r["kind"] == KIND, ("tables/scaling",
                                                              "figures/scaling.png"),
    trajectory.TRANSFORMER_TASKS, in_reproduce=False, needs=("sharpness", "attribution"))
