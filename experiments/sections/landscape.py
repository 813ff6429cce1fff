"""Figures 2-4 and 7-16: the test-batch loss along each normalized pseudo-update direction,
one PNG per (task, trajectory, probe epoch), with and without Adafactor; clipped variants in
the same colour as their base algorithm, lighter. Plus the best local loss reduction."""

from __future__ import annotations

import numpy as np

from experiments import probing
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import bootstrap_interval, mean_std, write_table
from experiments.paper.claims import verdict
from experiments.setup.experiment import on_probe_units

NAME = "landscape"


def _style(label, labels):
  """A colour per base algorithm; its clipped variants lighter and dashed."""
  import matplotlib.cm as cm
  variant = probing.KNOWN[label]
  bases = list(dict.fromkeys(probing.KNOWN[l].base for l in labels))
  colour = cm.tab10(bases.index(variant.base) % 10)
  return (colour, 0.45, "--") if variant.clipped else (colour, 1.0, "-")


def plot(runs, path: str, *, with_adafactor: bool) -> None:
  """The probe-batch loss along each direction: the mean over seeds, and a band from the
  lowest to the highest seed."""
  fig, ax = new_figure(figsize=(6.5, 4.2))
  first = runs[0]
  steps = np.asarray(first["step_sizes"])
  curves = np.asarray([r["landscape"] for r in runs], np.float64)  # (seeds, K, S)
  labels = [l for l in first["algorithms"] if l in probing.PAPER_LABELS[first["kind"]]]
  for name in labels:
    if not with_adafactor and name.startswith("adafactor"):
      continue
    index = first["algorithms"].index(name)
    colour, alpha, linestyle = _style(name, labels)
    ax.plot(steps[1:], curves[:, index, 1:].mean(0), label=name, color=colour, alpha=alpha,
            linestyle=linestyle)
    if len(runs) > 1:
      ax.fill_between(steps[1:], curves[:, index, 1:].min(0), curves[:, index, 1:].max(0),
                      color=colour, alpha=0.12 * alpha)
  ax.axhline(curves[:, 0, 0].mean(), color="grey", linewidth=0.8, linestyle=":")
  ax.set_xscale("log")
  ax.set_xlabel("step size (distance along u/‖u‖)")
  ax.set_ylabel("probe-batch loss")
  ax.set_title(f"{first['task']}, {first['trajectory']} trajectory, epoch {first['epoch']}, "
               f"{len(runs)} seed(s)" + ("" if with_adafactor else " (without Adafactor)"))
  ax.legend(fontsize=6, ncol=2)
  save_figure(fig, path)


RULE = ("at the last probe point of the SGD trajectory, reproduced if Adam's best one-step "
        "reduction (mean over seeds) exceeds SGD's")


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  rows, figures = [], []
  for (task, traj), by_epoch in sorted(groups.items()):
    for epoch, runs in sorted(by_epoch.items()):
      for with_adafactor in (True, False):
        name = f"landscape_{task}_{traj}_epoch{epoch}" + ("" if with_adafactor else "_no_adafactor")
        plot(runs, figure_path(out, name), with_adafactor=with_adafactor)
        figures.append(name)
      for algorithm in probing.PAPER_LABELS["transformer"]:
        index = runs[0]["algorithms"].index(algorithm)
        reductions, best_steps = zip(*(probing.best_reduction(r, index) for r in runs))
        mean, std = mean_std(reductions)
        rows.append([task, traj, epoch, algorithm, mean, std, float(np.median(best_steps))])
  table = write_table(out, "landscape_best_reduction",
                      ["task", "trajectory", "epoch", "algorithm",
                       "best loss reduction (mean)", "std", "best step (median)"], rows)
  text = ("### Loss landscape along the update directions (Figures 2-4, 7-16)\n\nEvery "
          "seed: the mean curve with a band from the lowest to the highest seed. Figures: "
          + ", ".join(f"`figures/{f}.png`" for f in figures[:6])
          + (f" and {len(figures) - 6} more" if len(figures) > 6 else "")
          + ".\n\n" + table)
  verdicts = []
  for task in probing.TRANSFORMER_TASKS:
    last = max((r[2] for r in rows if r[0] == task and r[1] == "sgd"), default=None)
    best = {r[3]: r[4] for r in rows if r[0] == task and r[1] == "sgd" and r[2] == last}
    if "adam" in best and "sgd" in best:
      adam, sgd = best["adam"], best["sgd"]
      runs = probing.grouped(records)[(task, "sgd")][last]
      gaps = [probing.best_reduction(r, r["algorithms"].index("adam"))[0]
              - probing.best_reduction(r, r["algorithms"].index("sgd"))[0] for r in runs]
      low, high = bootstrap_interval(gaps)
      verdicts.append(verdict("landscape", "reproduced" if adam > sgd else "not reproduced",
                              RULE, f"epoch {last}: Adam {adam:.3g} vs SGD {sgd:.3g}",
                              f"{task}, SGD trajectory",
                              value=f"Adam − SGD best reduction {adam - sgd:.3g} "
                                    f"[{low:.3g}, {high:.3g}] over seeds",
                              paper="Adam's larger (Figures 2-4)"))
  return text, verdicts


EXPERIMENT = on_probe_units(
    NAME, "Figures 2-4, 7-16: loss along every update direction", write,
    ("tables/landscape_best_reduction",
     "figures/landscape_<task>_<trajectory>_epoch<epoch>[_no_adafactor].png"), ("landscape",))
