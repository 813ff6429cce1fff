"""Figure 1: distribution of |update| coordinates of SGD (its momentum), Adam and Adafactor;
and the share of SGD's directional sharpness carried by its top coordinates."""

from __future__ import annotations

import numpy as np

from experiments import probing
from experiments.artifacts.figures import plot_coordinate_histograms
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import bootstrap_interval, mean_std, write_table
from experiments.paper.claims import verdict
from experiments.setup.experiment import on_probe_units

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
        get = lambda field: mean_std([r["attribution"][field][i] for r in runs])[0]
        relative = lambda field: mean_std([r["attribution"][field][i]
                                           / r["attribution"]["sharpness"] for r in runs])[0]
        rows.append([task, traj, epoch, fraction, get("share"), get("norm_share"),
                     relative("sharpness_clipped"), get("share_by_gradient"),
                     get("norm_share_by_gradient"), relative("sharpness_without_by_gradient")])
  table = write_table(out, "sharpness_attribution",
                      ["task", "trajectory", "epoch", "top fraction",
                       "share of SGD sharpness (top by |u|)", "share of ‖u‖² (by |u|)",
                       "clipped / full sharpness", "share of SGD sharpness (top by |g|)",
                       "share of ‖u‖² (by |g|)", "without top by |g| / full sharpness"], rows)
  sections.append("### Coordinate histograms (Figure 1) and attribution of SGD's sharpness\n\n"
                  "uᵀHu = Σᵢ uᵢ(Hu)ᵢ for SGD's direction u, split over its top coordinates by "
                  "|u| and by the probe-batch gradient |g| (Sections 4.1-4.2). Figures: "
                  "`figures/histogram_<task>_<trajectory>.png`.\n\n" + table)
  top = [r[4] for r in rows if abs(r[3] - 0.01) < 1e-9]
  if top:
    median = float(np.median(top))
    low, high = bootstrap_interval(top, np.median)
    verdicts.append(verdict("top_coordinates", "reproduced" if median > 0.5 else
                            "not reproduced", RULE,
                            f"the top 1% of SGD's coordinates carry a median {median:.0%} of "
                            "its sharpness", value=f"top 1% carry {median:.0%} [{low:.0%}, "
                                                   f"{high:.0%}] of SGD's sharpness",
                            paper="most of it (Figure 1)"))
  return "\n\n".join(sections), verdicts


RULE = ("reproduced if the top 1% of SGD's coordinates (by |u|) carry more than half of its "
        "directional sharpness, median over every probe point")


EXPERIMENT = on_probe_units(
    NAME, "Figure 1: |update| coordinate histograms, sharpness attribution", write,
    ("tables/sharpness_attribution", "figures/histogram_<task>_<trajectory>.png"),
    ("first_order", "attribution"))
