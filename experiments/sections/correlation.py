"""Gradient correlation, Eq. (1)'s first-order term, per task and probe epoch, and Appendix
C.3's trade-off between directional sharpness and gradient correlation (a figure)."""

from __future__ import annotations

from experiments import probing
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import bootstrap_interval, mean_std, write_table
from experiments.paper.claims import verdict
from experiments.setup.experiment import on_probe_units

NAME = "correlation"
RULE = ("at each probe point, SGD's direction has the largest −cos(∇f, u) among the paper's "
        "algorithms; reproduced if so at >= 75% of probe points, partly at >= 50%")


def _tradeoff_figure(out, task, traj, by_epoch) -> str:
  """C.3: |directional sharpness| against −cos(∇f, u), one point per direction and probe."""
  import matplotlib.cm as cm
  fig, ax = new_figure(figsize=(6.5, 4.2))
  labels = probing.PAPER_LABELS["transformer"]
  for index, name in enumerate(labels):
    x = [-probing.values(r, "cosine")[name] for runs in by_epoch.values() for r in runs]
    y = [abs(probing.values(r)[name]) for runs in by_epoch.values() for r in runs]
    ax.scatter(x, y, s=12, label=name, color=cm.tab20(index % 20))
  ax.set_yscale("log")
  ax.set_xlabel("gradient correlation −cos(∇f, u)")
  ax.set_ylabel("|directional sharpness|")
  ax.set_title(f"Sharpness vs gradient correlation, {task}, {traj} trajectory (App. C.3)")
  ax.legend(fontsize=5, ncol=2)
  name = f"tradeoff_{task}_{traj}"
  save_figure(fig, figure_path(out, name))
  return name


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  rows, figures, best, total, sgd_best = [], [], 0, 0, []
  labels = probing.PAPER_LABELS["transformer"]
  for (task, traj), by_epoch in sorted(groups.items()):
    figures.append(_tradeoff_figure(out, task, traj, by_epoch))
    for epoch, runs in sorted(by_epoch.items()):
      for name in labels:
        projection = [probing.values(r, "projection")[name] for r in runs]
        cosine = [probing.values(r, "cosine")[name] for r in runs]
        rows.append([task, traj, epoch, name, mean_std(projection)[0], mean_std(cosine)[0],
                     mean_std(cosine)[1]])
      for r in runs:
        cosine = probing.values(r, "cosine")
        total += 1
        best += min(labels, key=lambda n: cosine[n]) == "sgd"
        sgd_best.append(min(labels, key=lambda n: cosine[n]) == "sgd")
  table = write_table(out, "gradient_correlation",
                      ["task", "trajectory", "epoch", "algorithm", "⟨∇f, u⟩/‖u‖ (mean)",
                       "cos(∇f, u) (mean)", "cos std"], rows)
  share = best / total
  status = "reproduced" if share >= 0.75 else "partly reproduced" if share >= 0.5 else (
      "not reproduced")
  text = ("### Gradient correlation (Eq. 1's first-order term) and the trade-off (App. C.3)"
          "\n\n⟨∇f, u⟩/‖u‖ and cos(∇f, u) on the probe batch for every probe direction u "
          "(negative: a descent direction). Figures: "
          + ", ".join(f"`figures/{f}.png`" for f in figures) + ".\n\n" + table)
  low, high = bootstrap_interval(sgd_best)
  return text, [verdict("sgd_correlation", status, RULE,
                        f"SGD's was the most correlated at {best}/{total} probe points",
                        value=f"{share:.0%} of probe points [{low:.0%}, {high:.0%}]",
                        paper="SGD's the best correlated (Appendix C.3)")]


EXPERIMENT = on_probe_units(NAME, "Eq. 1's gradient correlation; Appendix C.3's trade-off",
                            write, ("tables/gradient_correlation",
                                    "figures/tradeoff_<task>_<trajectory>.png"),
                            ("first_order", "sharpness"))
