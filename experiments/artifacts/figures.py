"""Matplotlib helpers (headless) and the plots more than one experiment draws."""

from __future__ import annotations

import numpy as np

from optclip import spectrum


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


# SLQ's point masses smoothed by a Gaussian: the library's, so plots and JS distances agree.
spectral_density_curve = spectrum.density_curve


def plot_spectral_density(nodes, weights, path: str, title: str = "Hessian spectral density",
                          *, width: float | None = None, points: int = 400) -> None:
  """Plots `optclip.curvature.hessian_spectral_density`'s (nodes, weights) (or the
  Gauss-Newton one) as a smoothed density on a log-scaled axis; ``width`` defaults to 1% of
  the nodes' range."""
  nodes, weights = np.ravel(nodes), np.ravel(weights)
  span = max(float(nodes.max() - nodes.min()), 1e-12)
  width = width or 0.01 * span
  grid = np.linspace(nodes.min() - 0.05 * span, nodes.max() + 0.05 * span, points)
  fig, ax = new_figure(figsize=(6.5, 4))
  ax.semilogy(grid, np.maximum(spectral_density_curve(nodes, weights, grid, width), 1e-12))
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  ax.set_title(title)
  save_figure(fig, path)
