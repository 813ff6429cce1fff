"""Curvature statistics and pseudo-update probes against dense / independent computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optclip
from optclip import curvature, probes
from tests.test_geometry import PROBLEMS, dense_hessian


@pytest.mark.parametrize("name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_top_eigenvalue_and_diagonal_match_dense(name):
  loss, params, _ = PROBLEMS[name]()
  hessian, _, unravel = dense_hessian(loss, params)
  d = hessian.shape[0]
  top = curvature.top_hessian_eigenvalue(loss, params, iters=min(d, 60),
                                       key=jax.random.key(1))
  np.testing.assert_allclose(float(top), np.linalg.eigvalsh(hessian)[-1], rtol=1e-3)
  diag = curvature.hessian_diagonal(loss, params, method="exact")
  np.testing.assert_allclose(np.asarray(ravel_pytree(diag)[0]), np.diag(hessian),
                             rtol=1e-4, atol=1e-6)


def test_hutchinson_within_stated_error():
  loss, params, _ = PROBLEMS["mlp"]()
  hessian, _, _ = dense_hessian(loss, params)
  samples = 2000
  estimate = curvature.hessian_diagonal(loss, params, method="hutchinson", samples=samples,
                                      key=jax.random.key(0))
  got = np.asarray(ravel_pytree(estimate)[0])
  off = hessian - np.diag(np.diag(hessian))
  stderr = np.sqrt(np.sum(off ** 2, axis=1) / samples)
  assert np.all(np.abs(got - np.diag(hessian)) <= 5 * stderr + 1e-6)


def test_r_med_on_known_diagonal():
  diag = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[10.0, 4.0], [5.0, 6.0]])}
  # |H_ii| = 1, 2, 3, 4, 5, 6, 10: max 10, median (4th largest of 7) 4.
  np.testing.assert_allclose(float(curvature.r_med(diag)), 10 / 4)
  per_leaf = curvature.r_med(diag, per_leaf=True)
  np.testing.assert_allclose(float(per_leaf["a"]), 3 / 2)
  np.testing.assert_allclose(float(per_leaf["b"]), 10 / 6)  # upper median of 4 values


def test_r_med_of_a_diagonal_quadratic_hessian():
  curvatures = jnp.array([1.0, 2.0, 3.0, 50.0, 5.0])
  loss = lambda x: 0.5 * jnp.sum(curvatures * x * x)
  diag = curvature.hessian_diagonal(loss, jnp.ones(5))
  np.testing.assert_allclose(float(curvature.r_med(diag)), 50.0 / 3.0, rtol=1e-6)


def test_gauss_newton_against_dense_numpy():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  params = {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(2), jnp.float32)}
  # Make one input feature large so that its weights dominate the row norms.
  x = x.at[:, 0].multiply(20.0)

  def per_example(p, batch):
    def g(xi):
      logits = lambda q: xi @ q["w"] + q["b"]
      prob = jax.nn.softmax(logits(p))
      diff = jax.grad(lambda q: logits(q)[0] - logits(q)[1])(p)
      return jax.tree.map(lambda t: jnp.sqrt(prob[0] * prob[1]) * t, diff)
    return jax.vmap(g)(batch)

  result = curvature.gauss_newton_spectral_norm(per_example, params, x, remove_ratio=1.5)
  rows = per_example(params, x)
  a = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda r: r[i], rows))[0], np.float64)
                for i in range(6)])
  g = a.T @ a
  np.testing.assert_allclose(float(result.spectral_norm), np.linalg.eigvalsh(g)[-1],
                             rtol=1e-4)
  row_norms = np.linalg.norm(a, axis=0)
  keep = row_norms < 1.5 * row_norms.mean()
  assert 0 < (~keep).sum() < keep.size
  np.testing.assert_allclose(float(result.fraction_removed), (~keep).mean(), rtol=1e-6)
  # ravel_pytree orders the leaves as jax.tree.leaves does: b (2 entries), then w (8).
  assert int(result.removed_per_leaf["b"]) == (~keep[:2]).sum()
  assert int(result.removed_per_leaf["w"]) == (~keep[2:]).sum()
  reduced = g[np.ix_(keep, keep)]
  np.testing.assert_allclose(float(result.reduced_spectral_norm),
                             np.linalg.eigvalsh(reduced)[-1], rtol=1e-4)
  np.testing.assert_allclose(float(result.ratio),
                             np.linalg.eigvalsh(g)[-1] / np.linalg.eigvalsh(reduced)[-1],
                             rtol=1e-4)


def _grads_and_params(seed=0, steps=5):
  rng = np.random.default_rng(seed)
  params = [{"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal(3), jnp.float32)} for _ in range(steps)]
  grads = [{"w": jnp.asarray(rng.standard_t(2, (4, 3)), jnp.float32),
            "b": jnp.asarray(rng.standard_t(2, 3), jnp.float32)} for _ in range(steps)]
  return grads, params


def test_pseudo_updates_equal_running_each_optimizer_alone():
  grads, params = _grads_and_params()
  optimizers = {"sgd": optclip.sgd(0.1, momentum=0.9, dampening=0.9),
                "sgd_clip": optclip.sgd(0.1, momentum=0.9, clip=0.1),
                "adam": optclip.adam(0.01, clip=0.5), "lion": optclip.lion(0.01)}
  tx = probes.with_pseudo_updates(optax.sgd(0.3), optimizers)
  state = tx.init(params[0])
  step = jax.jit(tx.update)
  for g, p in zip(grads[:-1], params[:-1]):
    _, state = step(g, state, p)
  updates = jax.jit(lambda s, g, p: probes.pseudo_updates(tx, s, g, p))(
      state, grads[-1], params[-1])
  for name, own_tx in optimizers.items():
    own_state = own_tx.init(params[0])
    update = jax.jit(own_tx.update)
    for g, p in zip(grads, params):
      own, own_state = update(g, own_state, p)
    chex.assert_trees_all_close(updates[name], own, rtol=1e-5, atol=1e-7)


def test_with_pseudo_updates_trains_like_its_training_optimizer():
  """The probes never touch the trajectory: updates and training state equal the training
  optimizer's alone, step by step, in an ordinary optax loop."""
  rng = np.random.default_rng(1)
  data = [jnp.asarray(rng.standard_normal((8, 3)), jnp.float32) for _ in range(6)]
  loss = lambda p, batch: jnp.mean(jnp.square(batch @ p["w"] - 1.0))
  params = {"w": jnp.ones((3, 2))}
  train = optclip.sgd(0.05, momentum=0.9)
  tx = probes.with_pseudo_updates(train, {"adam": optclip.adam(1e-3),
                                          "sgd": optclip.sgd(0.05, momentum=0.9)})
  state, alone = tx.init(params), train.init(params)
  replay = params
  for batch in data:
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    own, alone = train.update(jax.grad(loss)(replay, batch), alone, replay)
    chex.assert_trees_all_close(updates, own, rtol=0, atol=0)
    params, replay = optax.apply_updates(params, updates), optax.apply_updates(replay, own)
    # The "sgd" probe is the training optimizer itself: its state is the trajectory's.
    chex.assert_trees_all_close(state.probes["sgd"], state.train, rtol=0, atol=0)
  chex.assert_trees_all_close(state.train, alone, rtol=0, atol=0)


# --- the curvature suite on matfree, against dense jnp.linalg.eigh(jax.hessian(...)) -----

def _dense_spectrum(name):
  loss, params, _ = PROBLEMS[name]()
  hessian, _, unravel = dense_hessian(loss, params)
  values, vectors = np.linalg.eigh(hessian)
  return loss, params, hessian, values[::-1], vectors[:, ::-1], unravel


@pytest.mark.parametrize("name", ["quadratic", "mlp"])
def test_hessian_eigenpairs_match_dense(name):
  loss, params, hessian, values, vectors, _ = _dense_spectrum(name)
  n, k = hessian.shape[0], 3
  got, eigenvectors = jax.jit(lambda p: curvature.hessian_eigenpairs(
      loss, p, k, num_matvecs=n, key=jax.random.key(2)))(params)
  assert got.shape == (k,)
  np.testing.assert_allclose(np.asarray(got), values[:k], rtol=1e-3, atol=1e-4)
  for i in range(k):
    v = np.asarray(ravel_pytree(jax.tree.map(lambda x: x[i], eigenvectors))[0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-4)
    if values[i] - values[i + 1] > 1e-2 * abs(values[0]):  # a separated eigenvalue
      assert abs(v @ vectors[:, i]) > 0.999


@pytest.mark.parametrize("method", ["hutch++", "xtrace", "hutchinson"])
def test_hessian_trace_within_its_error(method):
  loss, params, hessian, values, _, _ = _dense_spectrum("mlp")
  want = float(np.trace(hessian))
  result = jax.jit(lambda p: curvature.hessian_trace(loss, p, num_matvecs=24, method=method,
                                                     key=jax.random.key(4)))(params)
  assert float(result.stderr) > 0
  assert abs(float(result.trace) - want) <= 4 * float(result.stderr) + 1e-6
  # With as many products as the dimension, it is exact.
  exact = curvature.hessian_trace(loss, params, num_matvecs=hessian.shape[0])
  np.testing.assert_allclose(float(exact.trace), want, rtol=1e-4)


def test_spectral_density_moments_match_dense():
  """Σ w θ^m ≈ tr(H^m)/n for m = 0, 1, 2 (stochastic Lanczos quadrature is exact for
  polynomials of degree < 2·steps in each probe vector; the rest is Monte Carlo error)."""
  loss, params, hessian, values, _, _ = _dense_spectrum("mlp")
  n = hessian.shape[0]
  nodes, weights = jax.jit(lambda p: curvature.hessian_spectral_density(
      loss, p, num_matvecs=20, num_samples=200, key=jax.random.key(5)))(params)
  nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
  scale = np.abs(values).max()
  for m in (1, 2):
    want = np.sum(values ** m) / n
    assert abs(np.sum(weights * nodes ** m) - want) < 0.1 * scale ** m, m


def test_gauss_newton_suite_matches_dense():
  """G = Jᵀ ∇²ℓ J for a softmax cross-entropy MLP, materialised densely."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 12))
  params = {"w": jnp.asarray(rng.standard_normal((4, 5)) * 0.5, jnp.float32),
            "v": jnp.asarray(rng.standard_normal((5, 3)) * 0.5, jnp.float32)}
  outputs = lambda p: jnp.tanh(x @ p["w"]) @ p["v"]
  output_loss = lambda z: -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(12), y])
  flat, unravel = ravel_pytree(params)
  jac = jax.jacobian(lambda f: outputs(unravel(f)).ravel())(flat)
  h_out = jax.hessian(lambda z: output_loss(z.reshape(12, 3)))(outputs(params).ravel())
  dense = np.asarray(jac.T @ h_out @ jac, np.float64)
  values = np.linalg.eigvalsh(dense)[::-1]
  got, _ = curvature.gauss_newton_eigenpairs(outputs, output_loss, params, 2,
                                             num_matvecs=dense.shape[0])
  np.testing.assert_allclose(np.asarray(got), values[:2], rtol=1e-3, atol=1e-5)
  exact = curvature.gauss_newton_trace(outputs, output_loss, params, num_matvecs=dense.shape[0])
  np.testing.assert_allclose(float(exact.trace), np.trace(dense), rtol=1e-4)
  nodes, weights = curvature.gauss_newton_spectral_density(outputs, output_loss, params,
                                                           num_matvecs=8, num_samples=4)
  assert np.all(np.asarray(nodes) > -1e-4)  # G is positive semi-definite
  np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, rtol=1e-5)


def test_hutchinson_diagonal_reports_its_standard_error():
  loss, params, _ = PROBLEMS["mlp"]()
  hessian, _, _ = dense_hessian(loss, params)
  estimate = curvature.hessian_diagonal_hutchinson(loss, params, samples=400,
                                                   key=jax.random.key(3))
  mean = np.asarray(ravel_pytree(estimate.mean)[0], np.float64)
  stderr = np.asarray(ravel_pytree(estimate.stderr)[0], np.float64)
  off = hessian - np.diag(np.diag(hessian))
  np.testing.assert_allclose(stderr, np.sqrt(np.sum(off ** 2, axis=1) / 400), rtol=0.3,
                             atol=1e-7)
  assert np.mean(np.abs(mean - np.diag(hessian)) <= 3 * stderr + 1e-7) > 0.95


def test_a_static_follow_trains_like_the_selecting_one():
  """following(..., static=True) fixes the followed probe when traced: the same updates and
  states, bit for bit, as the step that selects it from every probe's update."""
  grads, params = _grads_and_params(seed=3)
  optimizers = {"sgd": optclip.sgd(1.0, momentum=0.9, dampening=0.9),
                "adam": optclip.adam(1.0, clip=0.5), "lion": optclip.lion(1.0)}
  for name in optimizers:
    selecting = probes.following(optimizers, name, 0.01)
    static = probes.following(optimizers, name, 0.01, static=True)
    a, b = selecting.init(params[0]), static.init(params[0])
    chex.assert_trees_all_equal(a, b)
    for g, p in zip(grads, params):
      ua, a = jax.jit(selecting.update)(g, a, p)
      ub, b = jax.jit(static.update)(g, b, p)
      chex.assert_trees_all_equal(ua, ub)
      chex.assert_trees_all_equal(a, b)
