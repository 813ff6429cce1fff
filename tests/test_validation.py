"""Every public function refuses what it cannot answer, naming the argument, instead of
answering wrong in silence; eager updates compile once."""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip
from optclip import curvature

LOSS = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(jnp.arange(1.0, 3.0) * p["v"] ** 2)
PARAMS = {"w": jnp.arange(6.0) / 6, "v": jnp.ones(2)}


def test_trace_with_too_few_products_is_refused():
  """With 3 products Hutch++ has one Monte Carlo sample: its standard error would read 0,
  which TraceEstimate reserves for an exact trace."""
  for method in ("hutch++", "xtrace"):
    with pytest.raises(ValueError, match="num_matvecs=3 is too few"):
      curvature.hessian_trace(LOSS, PARAMS, num_matvecs=3, method=method)
  estimate = curvature.hessian_trace(LOSS, PARAMS, num_matvecs=4)
  assert float(estimate.stderr) > 0
  exact = curvature.hessian_trace(LOSS, PARAMS, num_matvecs=8)  # the dimension: exact
  dense = jax.hessian(lambda f: LOSS({"v": f[6:], "w": f[:6]}))(
      jnp.concatenate([PARAMS["w"], PARAMS["v"]]))
  np.testing.assert_allclose(float(exact.trace), float(jnp.trace(dense)), rtol=1e-5)
  assert float(exact.stderr) == 0


def test_eigenpairs_refuse_fewer_products_than_pairs_and_non_integer_k():
  with pytest.raises(ValueError, match=r"num_matvecs \(2\) must be at least k \(3\)"):
    curvature.hessian_eigenpairs(LOSS, PARAMS, k=3, num_matvecs=2)
  with pytest.raises(ValueError, match="k must be a positive integer, got 2.0"):
    curvature.hessian_eigenpairs(LOSS, PARAMS, k=2.0)
  with pytest.raises(ValueError, match="iters must be a positive integer"):
    curvature.top_hessian_eigenvalue(LOSS, PARAMS, iters=0)


def test_top_eigenvalue_survives_krylov_breakdown():
  """100 Lanczos steps on an 8-dimensional problem: the Krylov space is exhausted after 8;
  the answer is the dense top eigenvalue, not NaN."""
  diag = jnp.arange(1.0, 9.0)
  loss = lambda x: jnp.sum(diag * x ** 2)
  value = curvature.top_hessian_eigenvalue(loss, jnp.ones(8), iters=100)
  np.testing.assert_allclose(float(value), 16.0, rtol=1e-5)
  # A diagonal operator whose start vector only spans 2 eigenvectors breaks down at step 2.
  negative = lambda x: -jnp.sum(diag * x ** 2)
  np.testing.assert_allclose(float(curvature.top_hessian_eigenvalue(negative, jnp.ones(8),
                                                                    iters=30)), -2.0,
                             rtol=1e-4)


def test_diagonal_entries_refuse_indices_outside_their_leaf():
  with pytest.raises(ValueError, match=r"indices\['w'\]: flat indices must lie in \[0, 6\)"):
    curvature.hessian_diagonal_entries(LOSS, PARAMS, {"w": np.array([99]), "v": np.array([0])})


def test_directions_are_matched_as_a_tree_and_shape_errors_name_the_leaf():
  same_shapes = {"x": jnp.ones(2), "y": jnp.ones(6)}  # other keys, same shapes
  with pytest.raises(ValueError, match="structure of params"):
    optclip.directional_sharpness(LOSS, PARAMS, same_shapes)
  with pytest.raises(ValueError, match=r"directions\['w'\] has shape \(5,\)"):
    optclip.directional_sharpness(LOSS, PARAMS, {"w": jnp.ones(5), "v": jnp.ones(2)})
  with pytest.raises(ValueError, match="is zero"):
    optclip.directional_sharpness(LOSS, PARAMS, {"w": jnp.zeros(6), "v": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"direction\(s\) \[1\] is zero"):
    optclip.directional_sharpness(LOSS, PARAMS, {"w": jnp.stack([jnp.ones(6), jnp.zeros(6)]),
                                                 "v": jnp.zeros((2, 2))})


def test_python_float_leaves_are_clipped_like_arrays():
  grads = {"a": 1.5, "b": jnp.asarray([0.5, -2.0, 0.1])}
  tx = optclip.adam(0.1, clip=0.5)
  updates, state = tx.update(grads, tx.init(grads), grads)
  expected, _ = tx.update({"a": jnp.asarray(1.5), "b": grads["b"]},
                          tx.init({"a": jnp.asarray(1.5), "b": grads["b"]}), grads)
  np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(expected["a"]))
  assert float(optclip.clip_threshold(grads, 0.5)) == 1.5


def test_top_eigenvalue_runs_on_explicitly_sharded_parameters():
  """The path the README recommends for sharded parameters, under `jax.set_mesh`: equal to
  the unsharded value (8 host devices, in a subprocess so this process keeps one)."""
  code = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from optclip import curvature, sharding
mesh = sharding.mesh_from_spec("fsdp=8")
rng = np.random.default_rng(0)
a = rng.standard_normal((128, 128)).astype(np.float32)
params = {"w": jnp.asarray(a) * 0.1, "b": jnp.ones(16)}
# Only elementwise work and full reductions: a matmul contracting the sharded axis is the
# user's to annotate under explicit sharding, not this test's subject.
loss = lambda p: jnp.sum(jnp.sin(p["w"]) * p["w"]) + jnp.sum(p["w"] ** 2) * jnp.sum(p["b"] ** 2)
plain = float(curvature.top_hessian_eigenvalue(loss, params, iters=12))
with jax.set_mesh(mesh):
  placed = sharding.shard_params(params, mesh, min_size=1)
  assert sharding.explicit_spec(placed["w"]) is not None
  value = float(jax.jit(lambda p: curvature.top_hessian_eigenvalue(loss, p, iters=12))(placed))
np.testing.assert_allclose(value, plain, rtol=1e-4)
print("ok", value, plain)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


class _Compiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record):
    if "Finished XLA compilation" in record.getMessage():
      self.count += 1


def test_an_eager_clipped_update_compiles_once():
  """Un-jitted updates reuse their programs: the clip statistics used to build a reduction
  with a fresh combiner at every call, compiling every step."""
  params = {"w": jnp.ones((7, 7)), "b": jnp.zeros(7)}
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(
      p.shape), params)
  tx = optclip.adam(1e-3, clip=0.5)
  state = tx.init(params)
  counter = _Compiles()
  logger = logging.getLogger("jax._src.dispatch")
  logger.addHandler(counter)
  previous = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  try:
    updates, state = tx.update(grads, state, params)  # the first call compiles
    first = counter.count
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
  finally:
    jax.config.update("jax_log_compiles", previous)
    logger.removeHandler(counter)
  assert first > 0 and counter.count == first, (first, counter.count)
  assert np.all(np.isfinite(np.asarray(updates["w"])))
