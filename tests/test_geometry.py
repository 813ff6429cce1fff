"""Geometry probes against dense jax.hessian / NumPy on small problems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optclip
from optclip import geometry


def quadratic_problem():
  rng = np.random.default_rng(0)
  m = rng.standard_normal((6, 6))
  a = jnp.asarray(m @ m.T + np.diag([100.0, 1, 1, 1, 1, 1]), jnp.float32)
  params = {"x": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  return (lambda p: p["x"] @ a @ p["x"]), params, np.asarray(a) * 2


def mlp_problem():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
  params = {"w1": jnp.asarray(rng.standard_normal((5, 7)) * 0.5, jnp.float32),
            "b1": jnp.zeros(7), "w2": jnp.asarray(rng.standard_normal((7, 2)) * 0.5,
                                                  jnp.float32)}

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(jnp.square(h @ p["w2"] - y))
  return loss, params, None


def transformer_problem():
  """One pre-norm self-attention + MLP block with a token cross-entropy loss."""
  rng = np.random.default_rng(2)
  vocab, d, seq = 11, 8, 5
  tokens = jnp.asarray(rng.integers(0, vocab, (3, seq)))
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
  params = {"emb": normal(vocab, d), "qkv": normal(d, 3 * d), "out": normal(d, d),
            "mlp1": normal(d, 2 * d), "mlp2": normal(2 * d, d), "scale": jnp.ones(d)}

  def loss(p):
    h = p["emb"][tokens]
    n = h / jnp.sqrt(jnp.mean(h ** 2, -1, keepdims=True) + 1e-6) * p["scale"]
    q, k, v = jnp.split(n @ p["qkv"], 3, axis=-1)
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    att = jax.nn.softmax(jnp.where(mask, q @ k.swapaxes(-1, -2) / jnp.sqrt(d), -1e9), -1)
    h = h + (att @ v) @ p["out"]
    h = h + jax.nn.gelu(h @ p["mlp1"]) @ p["mlp2"]
    logits = h @ p["emb"].T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                                    tokens[:, 1:]))
  return loss, params, None


PROBLEMS = {"quadratic": quadratic_problem, "mlp": mlp_problem,
            "transformer": transformer_problem}
# The transformer cases take minutes on 2 CPU cores: run them with `pytest -m slow`.
PROBLEM_NAMES = ["quadratic", "mlp", pytest.param("transformer", marks=pytest.mark.slow)]


def dense_hessian(loss, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64), flat, unravel


def random_directions(params, k, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((k,) + p.shape), jnp.float32), params)


@pytest.mark.parametrize("method", ["auto", "forward", "hvp", "jet"])
@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_directional_sharpness_matches_dense_hessian(name, method):
  loss, params, _ = PROBLEMS[name]()
  hessian, _, _ = dense_hessian(loss, params)
  directions = random_directions(params, 4, seed=3)
  got = jax.jit(lambda d: optclip.directional_sharpness(loss, params, d, method=method))(
      directions)
  assert got.shape == (4,)
  for i in range(4):
    u = np.asarray(ravel_pytree(jax.tree.map(lambda d: d[i], directions))[0], np.float64)
    want = u @ hessian @ u / (u @ u)
    np.testing.assert_allclose(float(got[i]), want, rtol=2e-4, atol=1e-5)
    single = jax.jit(lambda d: optclip.directional_sharpness(loss, params, d, method=method))(
        jax.tree.map(lambda d: d[i], directions))
    np.testing.assert_allclose(float(single), float(got[i]), rtol=1e-5, atol=1e-6)


def test_quadratic_closed_form():
  loss, params, two_a = quadratic_problem()
  u = {"x": jnp.asarray(np.arange(6.0), jnp.float32)}
  ua = np.arange(6.0)
  np.testing.assert_allclose(float(optclip.directional_sharpness(loss, params, u)),
                             ua @ two_a @ ua / (ua @ ua), rtol=1e-5)


def test_robust_variant_shifts_exactly_the_negative_directions():
  # f(x) = x0^3 - x1^2 + x0 x1: at x = (0.5, 0), H = [[3, 1], [1, -2]].
  loss = lambda p: p[0] ** 3 - p[1] ** 2 + p[0] * p[1]
  x = jnp.array([0.5, 0.0])
  dirs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.3, -1.0]])
  h = np.array([[3.0, 1.0], [1.0, -2.0]])
  plain = np.array([d @ h @ d / (d @ d) for d in np.asarray(dirs)])
  result = jax.jit(lambda d: optclip.directional_sharpness(loss, x, d, robust_delta=0.01))(
      dirs)
  np.testing.assert_array_equal(np.asarray(result.shifted), plain < 0)
  for i, d in enumerate(np.asarray(dirs)):
    if plain[i] < 0:
      shifted_x = np.asarray(x) + 0.01 * d / np.linalg.norm(d)
      h_shift = np.array([[6 * shifted_x[0], 1.0], [1.0, -2.0]])
      want = d @ h_shift @ d / (d @ d)
    else:
      want = plain[i]
    np.testing.assert_allclose(float(result.robust[i]), want, rtol=1e-5)
  # The raw values are kept beside the shifted ones, negative ones included.
  np.testing.assert_allclose(np.asarray(result.sharpness), plain, rtol=1e-5)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_landscape_and_taylor(name):
  loss, params, _ = PROBLEMS[name]()
  directions = random_directions(params, 3, seed=4)
  steps = jnp.array([0.0, 1e-3, 0.1])
  grid = jax.jit(lambda d: optclip.landscape(loss, params, d, steps))(directions)
  assert grid.shape == (3, 3)
  np.testing.assert_allclose(np.asarray(grid[:, 0]), float(loss(params)), rtol=1e-6)
  hessian, flat, unravel = dense_hessian(loss, params)
  grad = np.asarray(ravel_pytree(jax.grad(loss)(params))[0], np.float64)
  for i in range(3):
    u = np.asarray(ravel_pytree(jax.tree.map(lambda d: d[i], directions))[0], np.float64)
    for j, s in enumerate(np.asarray(steps)):
      x = np.asarray(flat, np.float64) + s * u / np.linalg.norm(u)
      np.testing.assert_allclose(float(grid[i, j]), float(loss(unravel(jnp.asarray(
          x, jnp.float32)))), rtol=1e-5)
    # Eq. (1) with a tiny step predicts the landscape.
    step = 1e-3 * u / np.linalg.norm(u)
    terms = geometry.taylor_decomposition(loss, params, unravel(jnp.asarray(step, jnp.float32)))
    np.testing.assert_allclose(float(terms.first_order), grad @ step, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(float(terms.second_order), 0.5 * step @ hessian @ step,
                               rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(float(terms.predicted), float(grid[i, 1]), rtol=1e-5)
  batched = optclip.landscape(loss, params, directions, steps, batch_size=2)
  np.testing.assert_allclose(np.asarray(batched), np.asarray(grid), rtol=1e-6)


def test_gradient_correlation():
  g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
  u = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([0.0])}
  result = optclip.gradient_correlation(g, u)
  np.testing.assert_allclose(float(result.projection), -3 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(float(result.cosine), -3 / (5 * np.sqrt(2)), rtol=1e-6)


def test_sharpness_attribution_on_a_diagonal_quadratic():
  # One sharp coordinate with the largest update: it carries (almost) all the sharpness.
  diag = jnp.array([100.0, 1.0, 1.0, 1.0])
  loss = lambda x: 0.5 * jnp.sum(diag * x * x)
  u = jnp.array([4.0, 1.0, -1.0, 0.5])
  out = geometry.sharpness_attribution(loss, jnp.zeros(4), u, fractions=(0.25, 1.0))
  ua, d = np.asarray(u), np.asarray(diag)
  total = np.sum(d * ua ** 2)
  np.testing.assert_allclose(float(out["sharpness"]), total / np.sum(ua ** 2), rtol=1e-6)
  np.testing.assert_allclose(float(out["share"][0]), 1600 / total, rtol=1e-6)
  np.testing.assert_allclose(float(out["norm_share"][0]), 16 / np.sum(ua ** 2), rtol=1e-6)
  rest = ua.copy(); rest[0] = 0
  np.testing.assert_allclose(float(out["sharpness_without"][0]),
                             np.sum(d * rest ** 2) / np.sum(rest ** 2), rtol=1e-6)
  np.testing.assert_allclose(float(out["share"][1]), 1.0, rtol=1e-6)
  # Selected by another tree's magnitudes (the gradient, say): coordinate 1 instead of 0.
  picked = geometry.sharpness_attribution(loss, jnp.zeros(4), u, fractions=(0.25,),
                                          select_by=jnp.array([0.0, 9.0, 1.0, 1.0]))
  np.testing.assert_allclose(float(picked["share"][0]), 1.0 / total, rtol=1e-6)
  np.testing.assert_allclose(float(picked["norm_share"][0]), 1.0 / np.sum(ua ** 2), rtol=1e-6)


def test_coordinate_histogram_counts():
  tree = {"a": jnp.array([1e-3, 2e-3, 0.0, -5e-1]), "b": jnp.array([[1e-8]])}
  counts, edges, zeros = geometry.coordinate_histogram(tree, bins=16, value_range=(-10, 2))
  logs = np.log10([1e-3, 2e-3, 5e-1, 1e-8])
  want, _ = np.histogram(logs, bins=np.asarray(edges))
  np.testing.assert_array_equal(np.asarray(counts), want)
  assert int(zeros) == 1


def test_auto_falls_back_to_forward_mode_where_jet_has_no_rule():
  """jax.nn.relu is a custom_jvp function, on which jet leaks tracers: "auto" still gives
  the exact value (by forward mode)."""
  loss, params, hessian_like = quadratic_problem()
  relu_loss = lambda p: loss(p) + jnp.sum(jax.nn.relu(p["x"]))  # relu is linear a.e.
  direction = {"x": jnp.asarray(np.arange(6.0), jnp.float32)}
  want = optclip.directional_sharpness(loss, params, direction, method="forward")
  got = optclip.directional_sharpness(relu_loss, params, direction)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
