"""Figures 2-4 and 7-16: the test-batch loss along each normalized pseudo-update direction,
one PNG per (task, trajectory, probe epoch), with and without Adafactor; clipped variants in
the same colour as their base algorithm, lighter. Plus the best local loss reduction."""

from __future__ import annotations

import numpy as np

from experiments import probing, trajectory
from experiments.figures import new_figure, save_figure
from experiments.run_folder import figure_path
from experiments.tables import mean_std, write_table
from experiments.variants import by_label

NAME = "landscape"


def _style(label, labels):
  """A colour per base algorithm; its clipped variants lighter and dashed."""
  import matplotlib.cm as cm
  known = by_label(v for probes in trajectory.PROBES.values() for v in probes)
  variant = known[label]
  bases = list(dict.fromkeys(known[l].base for l in labels))
  colour = cm.tab10(bases.index(variant.base) % 10)
  return (colour, 0.45, "--") if variant.clipped else (colour, 1.0, "-")


def plot(record, path: str, *, with_adafactor: bool) -> None:
  fig, ax = new_figure(figsize=(6.5, 4.2))
  steps = np.asarray(record["step_sizes"])
  curves = np.asarray(record["landscape"], np.float64)
  for name, curve in zip(record["algorithms"], curves):
    if not with_adafactor and name.startswith("adafactor"):
      continue
    colour, alpha, linestyle = _style(name, record["algorithms"])
    ax.plot(steps[1:], curve[1:], label=name, color=colour, alpha=alpha, linestyle=linestyle)
  ax.axhline(curves[0, 0], color="grey", linewidth=0.8, linestyle=":")
  ax.set_xscale("log")
  ax.set_xlabel("step size (distance along u/‖u‖)")
  ax.set_ylabel("test-batch loss")
  ax.set_title(f"{record['task']}, {record['trajectory']} trajectory, epoch {record['epoch']}"
               + ("" if with_adafactor else " (without Adafactor)"))
  ax.legend(fontsize=6, ncol=2)
  save_figure(fig, path)


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  rows, figures = [], []
  for (task, traj), by_epoch in sorted(groups.items()):
    for epoch, runs in sorted(by_epoch.items()):
      for with_adafactor in (True, False):
        name = f"landscape_{task}_{traj}_epoch{epoch}" + ("" if with_adafactor else "_no_adafactor")
        plot(runs[0], figure_path(out, name), with_adafactor=with_adafactor)
        figures.append(name)
      for index, algorithm in enumerate(runs[0]["algorithms"]):
        reductions = [r["landscape"][index][0] - min(r["landscape"][index]) for r in runs]
        best_steps = [r["step_sizes"][int(np.argmin(r["landscape"][index]))] for r in runs]
        mean, std = mean_std(reductions)
        rows.append([task, traj, epoch, algorithm, mean, std, float(np.median(best_steps))])
  table = write_table(out, "landscape_best_reduction",
                             ["task", "trajectory", "epoch", "algorithm",
                              "best loss reduction (mean)", "std", "best step (median)"], rows)
  text = ("### Loss landscape along the update directions\n\nFigures: "
          + ", ".join(f"`figures/{f}.png`" for f in figures[:6])
          + (f" and {len(figures) - 6} more" if len(figures) > 6 else "")
          + ".\n\n" + table)
  verdicts = []
  for task in probing.TRANSFORMER_TASKS:
    best = {r[3]: r[4] for r in rows if r[0] == task and r[1] == "sgd"}
    if best:
      adam, sgd = best.get("adam"), best.get("sgd")
      if adam is not None and sgd is not None:
        verdicts.append(f"Adam's direction allows a larger one-step loss reduction than SGD's "
                        f"(Figures 2-4) — {task}, SGD trajectory: "
                        f"**{'reproduced' if adam > sgd else 'not reproduced'}** "
                        f"(last listed probe: Adam {adam:.3g} vs SGD {sgd:.3g})")
  return text, verdicts
