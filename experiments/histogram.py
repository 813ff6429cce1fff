"""Figure 1: distribution of |update| coordinates of SGD (its momentum), Adam and Adafactor;
and the share of SGD's directional sharpness carried by its top coordinates."""

from __future__ import annotations

import numpy as np

from experiments import paper_values, probing
from experiments.figures import plot_coordinate_histograms
from experiments.run_folder import figure_path
from experiments.tables import mean_std, write_table

NAME = "histogram"


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  sections, verdicts, rows = [], [], []
  for (task, traj), by_epoch in sorted(groups.items()):
    last = by_epoch[max(by_epoch)][0]
    low, high = last["histogram_range"]
    edges = np.linspace(low, high, len(next(iter(last["histograms"].values()))[0]) + 1)
    plot_coordinate_histograms(
        {name: (counts, edges, zeros) for name, (counts, zeros) in last["histograms"].items()},
        figure_path(out, f"histogram_{task}_{traj}"),
        f"{task}, {traj} trajectory, epoch {last['epoch']}")
    for epoch, runs in sorted(by_epoch.items()):
      fractions = runs[0]["attribution"]["fractions"]
      for i, fraction in enumerate(fractions):
        share = [r["attribution"]["share"][i] for r in runs]
        norm = [r["attribution"]["norm_share"][i] for r in runs]
        clipped = [r["attribution"]["sharpness_clipped"][i] / r["attribution"]["sharpness"]
                   for r in runs]
        rows.append([task, traj, epoch, fraction, mean_std(share)[0],
                     mean_std(norm)[0], mean_std(clipped)[0]])
  table = write_table(out, "sharpness_attribution",
                             ["task", "trajectory", "epoch", "top fraction",
                              "share of SGD sharpness", "share of ‖u‖²",
                              "clipped / full sharpness"], rows)
  sections.append("### Coordinate histograms (Figure 1) and attribution of SGD's sharpness\n\n"
                  "Figures: `figures/histogram_<task>_<trajectory>.png`.\n\n" + table)
  top = [r[4] for r in rows if abs(r[3] - 0.01) < 1e-9]
  if top:
    median = float(np.median(top))
    verdicts.append(f"{paper_values.CLAIMS['top_coordinates']}: "
                    f"**{'reproduced' if median > 0.5 else 'not reproduced'}**, the top 1% of "
                    f"SGD's coordinates carry a median {median:.0%} of its sharpness")
  return "\n\n".join(sections), verdicts
