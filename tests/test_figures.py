"""The report's figures of the probes' outputs (experiments.artifacts.figures)."""

import jax
import jax.numpy as jnp
import numpy as np

import optclip
from experiments.artifacts.figures import (plot_coordinate_histograms, plot_spectral_density,
                                           spectral_density_curve)
from optclip import geometry
from tests.test_geometry import quadratic_problem


def test_plot_coordinate_histograms(tmp_path):
  tree = {"a": jnp.asarray(np.random.default_rng(0).standard_t(2, 1000), jnp.float32)}
  path = tmp_path / "h.png"
  plot_coordinate_histograms({"sgd": geometry.coordinate_histogram(tree)}, str(path), "t")
  assert path.stat().st_size > 1000


def test_spectral_density_plot_integrates_to_one_and_peaks_at_the_eigenvalues(tmp_path):
  """SLQ's nodes and weights of a known spectrum (dense eigh of a small Hessian), smoothed:
  the curve integrates to 1 and is largest near the heaviest eigenvalue."""
  loss, params, _ = quadratic_problem()
  nodes, weights = optclip.curvature.hessian_spectral_density(loss, params, num_matvecs=6,
                                                                num_samples=4)
  dense = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda x: loss({"x": x}))(params["x"])))
  grid = np.linspace(dense.min() - 50, dense.max() + 50, 20001)
  curve = spectral_density_curve(nodes, weights, grid, width=1.0)
  np.testing.assert_allclose(np.trapezoid(curve, grid), 1.0, atol=1e-3)
  assert np.min(np.abs(grid[np.argmax(curve)] - dense)) < 3.0
  path = tmp_path / "density.png"
  plot_spectral_density(nodes, weights, str(path))
  assert path.stat().st_size > 1000
