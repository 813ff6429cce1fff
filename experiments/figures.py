"""Matplotlib helpers (headless) and the plots more than one experiment draws."""

from __future__ import annotations

import numpy as np


def new_figure(*args, **kwargs):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_coordinate_histograms(histograms: dict, path: str, title: str) -> None:
  """Figure 1: {name: (counts, edges in log10 units, zeros)} from
  `optclip.geometry.coordinate_histogram`, as step curves of the fraction of coordinates on
  a log-scaled |coordinate| axis (exact zeros count in the denominator)."""
  fig, ax = new_figure(figsize=(6.5, 4))
  for name, (counts, edges, zeros) in histograms.items():
    counts = np.asarray(counts, np.float64)
    ax.stairs(counts / max(counts.sum() + float(zeros), 1), 10.0 ** np.asarray(edges),
              label=name)
  ax.set_xscale("log")
  ax.set_xlabel("|coordinate| of the update direction")
  ax.set_ylabel("fraction of coordinates")
  ax.set_title(title)
  ax.legend()
  save_figure(fig, path)
