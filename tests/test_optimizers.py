"""The optimizer family against NumPy transcriptions of Algorithms 3-9, and against optax."""


import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip
from tests import oracles

STEPS = 4


def _problem(name, seed=0):
  """A gradient sequence for a parameter pytree (matrix, vector, scalar / heavy tails)."""
  rng = np.random.default_rng(seed)
  if name == "mlp":
    shapes = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "scale": ()}
  elif name == "heavy_tailed":
    shapes = {"emb": (12, 4), "bias": (7,)}
  else:
    raise ValueError(name)
  keys = sorted(shapes)

  def draw():
    if name == "heavy_tailed":
      return {k: rng.standard_t(1.5, size=shapes[k]).astype(np.float32) for k in keys}
    return {k: rng.standard_normal(shapes[k]).astype(np.float32) for k in keys}

  params = [draw() for _ in range(STEPS)]
  grads = [draw() for _ in range(STEPS)]
  return keys, params, grads


def _run(tx, params_seq, grads_seq):
  state = tx.init(params_seq[0])
  update = jax.jit(tx.update)
  out = []
  for params, grads in zip(params_seq, grads_seq):
    updates, state = update(jax.tree.map(jnp.asarray, grads), state,
                            jax.tree.map(jnp.asarray, params))
    out.append(updates)
  return out


def _as_lists(keys, seq):
  return [[np.asarray(step[k], np.float64) for k in keys] for step in seq]


CASES = {
    "sgd": (lambda c, cu: optclip.sgd(0.1, 0.9, dampening=0.9, clip=c),
            lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c)),
    "normalized_sgd": (lambda c, cu: optclip.normalized_sgd(0.1, 0.9, clip=c),
                       lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c, normalize=True)),
    "signum": (lambda c, cu: optclip.signum(0.1, 0.9, clip=c),
                 lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c, sign=True)),
    "adam": (lambda c, cu: optclip.adam(0.1, clip=c, clip_update=cu),
             lambda g, p, c, cu: oracles.adam(g, 0.1, 0.9, 0.999, 1e-8, c, cu)),
    "lion": (lambda c, cu: optclip.lion(0.1, weight_decay=0.0, clip=c, clip_update=cu),
             lambda g, p, c, cu: oracles.lion(g, 0.1, 0.9, 0.99, c, cu)),
    "adafactor_relative": (lambda c, cu: optclip.adafactor(None, clip=c),
                           lambda g, p, c, cu: oracles.adafactor(g, p, None, c)),
    # A fixed rate is multiplied by max(ε₂, RMS(x)) as the paper's code does, unless asked not.
    "adafactor_fixed": (lambda c, cu: optclip.adafactor(0.05, clip=c),
                        lambda g, p, c, cu: oracles.adafactor(g, p, 0.05, c)),
    "adafactor_fixed_unscaled": (
        lambda c, cu: optclip.adafactor(0.05, clip=c, multiply_by_parameter_scale=False),
        lambda g, p, c, cu: oracles.adafactor(g, p, 0.05, c, scale=False)),
}
CLIPS = [(None, None), (0.1, None), (0.5, None), (1.0, None), (None, 0.5), (0.3, 0.5)]


@pytest.mark.parametrize("problem", ["mlp", "heavy_tailed"])
@pytest.mark.parametrize("clip,clip_update", CLIPS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_transcription(name, clip, clip_update, problem):
  make, reference = CASES[name]
  if clip_update is not None and name not in ("adam", "lion"):
    pytest.skip("clip_update exists for Adam and Lion only")
  keys, params, grads = _problem(problem)
  got = _as_lists(keys, _run(make(clip, clip_update), params, grads))
  want = reference(_as_lists(keys, grads), _as_lists(keys, params), clip, clip_update)
  for step_got, step_want in zip(got, want):
    for g, w in zip(step_got, step_want):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def _random_adam_args(rng):
  return dict(learning_rate=float(10 ** rng.uniform(-4, -1)), b1=float(rng.uniform(0.5, 0.99)),
              b2=float(rng.uniform(0.9, 0.9999)), eps=float(10 ** rng.uniform(-10, -4)),
              eps_root=float(rng.choice([0.0, 1e-12])),
              mu_dtype=[None, jnp.bfloat16][int(rng.integers(2))],
              nesterov=bool(rng.integers(2)))


def _random_lion_args(rng):
  return dict(learning_rate=float(10 ** rng.uniform(-4, -1)), b1=float(rng.uniform(0.5, 0.99)),
              b2=float(rng.uniform(0.9, 0.999)), mu_dtype=[None, jnp.bfloat16][int(rng.integers(2))],
              weight_decay=float(rng.choice([0.0, 1e-3, 0.1])),
              mask=[None, {"emb": True, "bias": False}][int(rng.integers(2))])


@pytest.mark.parametrize("problem", ["mlp", "heavy_tailed"])
def test_adam_and_lion_defaults_equal_optax(problem):
  keys, params, grads = _problem(problem, seed=1)
  chex.assert_trees_all_close(_run(optclip.adam(1e-3), params, grads),
                              _run(optax.adam(1e-3), params, grads), rtol=0, atol=0)
  chex.assert_trees_all_close(_run(optclip.lion(1e-3), params, grads),
                              _run(optax.lion(1e-3), params, grads), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_drop_in_for_random_hyperparameters(seed):
  """Unclipped: optax's optimizer, bit for bit, for any hyperparameters. Clipped at a
  fraction whose k is 1 (τ = max |g|: the clip changes nothing): the same updates through
  optclip's own clipped code path, which therefore mirrors optax's arithmetic, nesterov and
  mu_dtype included (to float32 rounding: XLA fuses that program differently)."""
  rng = np.random.default_rng(seed)
  keys, params, grads = _problem("heavy_tailed", seed=seed)
  for make_ours, make_theirs, args in [(optclip.adam, optax.adam, _random_adam_args(rng)),
                                       (optclip.lion, optax.lion, _random_lion_args(rng))]:
    want = _run(make_theirs(**args), params, grads)
    chex.assert_trees_all_close(_run(make_ours(**args), params, grads), want, rtol=0, atol=0)
    chex.assert_trees_all_close(_run(make_ours(**args, clip=1e-9), params, grads), want,
                                rtol=1e-6, atol=1e-9)


def test_clip_feeds_only_the_first_moment():
  # With clipping, Adam's nu must equal the unclipped run's nu (raw gradient).
  keys, params, grads = _problem("heavy_tailed", seed=3)
  def final_state(tx):
    state = tx.init(params[0])
    for g in grads:
      _, state = tx.update(g, state)
    return state[0]
  clipped, plain = final_state(optclip.adam(0.1, clip=0.1)), final_state(optclip.adam(0.1))
  assert clipped.count == plain.count
  chex.assert_trees_all_close(clipped.nu, plain.nu)
  assert not np.allclose(clipped.mu["emb"], plain.mu["emb"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_learning_rate_and_no_recompile(name):
  keys, params, grads = _problem("mlp", seed=4)
  schedule = optax.linear_schedule(0.1, 0.01, 3)
  factories = {
      "sgd": lambda: optclip.sgd(schedule, clip=0.1),
      "normalized_sgd": lambda: optclip.normalized_sgd(schedule, clip=0.1),
      "signum": lambda: optclip.signum(schedule),
      "adam": lambda: optclip.adam(schedule, clip=0.5),
      "lion": lambda: optclip.lion(schedule, clip_update=0.5),
      "adafactor_relative": lambda: optclip.adafactor(None, clip=0.5),
      "adafactor_fixed": lambda: optclip.adafactor(schedule, clip=0.5),
      "adafactor_fixed_unscaled": lambda: optclip.adafactor(
          schedule, clip=0.5, multiply_by_parameter_scale=False),
  }
  tx = factories[name]()
  traces = []

  @jax.jit
  def step(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params[0])
  for p, g in zip(params, grads):
    updates, state = step(g, state, p)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
  assert len(traces) == 1


def test_bad_clip_arguments_name_the_argument():
  for factory, arg in [(lambda v: optclip.sgd(0.1, clip=v), "clip"),
                       (lambda v: optclip.adam(0.1, clip=v), "clip"),
                       (lambda v: optclip.adam(0.1, clip_update=v), "clip_update"),
                       (lambda v: optclip.lion(0.1, clip_update=v), "clip_update"),
                       (lambda v: optclip.adafactor(clip=v), "clip")]:
    for bad in [0.0, 2.0, float("nan"), "half"]:
      with pytest.raises(ValueError, match=arg):
        factory(bad)
  with pytest.raises(ValueError, match="momentum_start"):
    optclip.sgd(0.1, momentum_start="one")


def test_relative_adafactor_needs_params():
  tx = optclip.adafactor()
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(3), tx.init(jnp.ones(3)))


def test_training_a_quadratic_decreases_loss():
  # f(x) = x^T A x with A11 = 100: every optimizer makes progress from the same start.
  diag = jnp.array([100.0] + [1.0] * 9)
  loss = lambda x: jnp.sum(diag * x * x)
  for tx in [optclip.sgd(4e-3), optclip.sgd(4e-3, clip=0.1), optclip.adam(0.05),
             optclip.lion(0.01), optclip.sign_sgd(0.01), optclip.normalized_sgd(0.01),
             optclip.adafactor(0.05, clip=0.5)]:
    x = jnp.ones(10)
    state = tx.init(x)
    for _ in range(50):
      updates, state = tx.update(jax.grad(loss)(x), state, x)
      x = optax.apply_updates(x, updates)
    assert float(loss(x)) < float(loss(jnp.ones(10)))


def test_adafactor_is_finite_where_a_factored_block_has_zero_gradient():
  # Conv taps that only ever see padding get exactly zero gradients; R·C of two ε₁-sized
  # factors underflows in float32, which once produced 0/0 = NaN.
  grads = {"kernel": jnp.zeros((3, 3, 8, 16)).at[0, 0].set(1.0)}
  tx = optclip.adafactor()
  updates, _ = tx.update(grads, tx.init(grads), grads)
  assert np.all(np.isfinite(updates["kernel"]))
  np.testing.assert_array_equal(updates["kernel"][1:], 0.0)


def test_momentum_started_at_the_first_gradient():
  """momentum_start="gradient": m₁ = ĝ₁, then m_t = β m_{t-1} + (1 - β) ĝ_t (the paper
  code's convention), against NumPy; the default is Algorithm 3's box (m₀ = 0)."""
  keys, params, grads = _problem("mlp", seed=5)
  for make, transform in [(functools.partial(optclip.sgd, dampening=0.9), lambda m: m),
                          (optclip.signum, np.sign),
                          (optclip.normalized_sgd,
                           lambda m: m / np.linalg.norm(m.ravel()) * np.sqrt(m.size))]:
    got = _as_lists(keys, _run(make(0.1, 0.9, clip=0.5, momentum_start="gradient"),
                               params, grads))
    momentum = None
    for step_got, g in zip(got, _as_lists(keys, grads)):
      g_hat = oracles.clip(g, 0.5)
      momentum = g_hat if momentum is None else [0.9 * m + 0.1 * x
                                                 for m, x in zip(momentum, g_hat)]
      for leaf_got, m in zip(step_got, momentum):
        np.testing.assert_allclose(leaf_got, -0.1 * transform(m), rtol=2e-5, atol=1e-7)


def _expected_clip_state(leaves, fraction):
  tau = oracles.threshold(leaves, fraction)
  flat = np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves])
  clipped = np.sign(flat) * np.minimum(np.abs(flat), tau)
  count = int(np.sum(np.abs(flat) > tau))
  return tau, count, count / flat.size, np.linalg.norm(flat), np.linalg.norm(clipped)


CLIPPED = {
    "coord_clip": lambda: optax.chain(optclip.coord_clip(0.3), optax.sgd(1.0)),
    "sgd": lambda: optclip.sgd(0.1, clip=0.3),
    "normalized_sgd": lambda: optclip.normalized_sgd(0.1, clip=0.3),
    "signum": lambda: optclip.signum(0.1, clip=0.3),
    "adam": lambda: optclip.adam(0.1, clip=0.3),
    "adafactor": lambda: optclip.adafactor(0.1, clip=0.3),
    "lion": lambda: optclip.lion(0.1, clip=0.3),
}


@pytest.mark.parametrize("name", sorted(CLIPPED))
def test_clip_statistics_in_the_state(name):
    """tree_get(state, "threshold") (and its siblings) of every clipped optimizer record what
    the last gradient's clip did, against NumPy."""
    keys, params, grads = _problem("heavy_tailed", seed=6)
    tx = CLIPPED[name]()
    state = tx.init(params[0])
    assert float(optax.tree_utils.tree_get(state, "threshold")) == np.inf
    update = jax.jit(tx.update)
    for g, p in zip(grads, params):
      _, state = update(g, state, p)
    tau, count, fraction, before, after = _expected_clip_state(
        [grads[-1][k] for k in keys], 0.3)
    get = lambda field: float(optax.tree_utils.tree_get(state, field))
    assert get("threshold") == tau
    assert get("clipped_count") == count
    np.testing.assert_allclose(get("clipped_fraction"), fraction, rtol=1e-6)
    np.testing.assert_allclose(get("norm_before"), before, rtol=1e-5)
    np.testing.assert_allclose(get("norm_after"), after, rtol=1e-5)
    assert count > 0 and get("norm_after") < get("norm_before")


def test_clip_update_statistics_and_both_clips():
  keys, params, grads = _problem("heavy_tailed", seed=7)
  tx = optclip.adam(0.1, clip_update=0.5)
  state = tx.init(params[0])
  updates, state = tx.update(grads[0], state, params[0])
  # The update clip runs on Adam's direction -updates/lr before the step size.
  direction = [np.asarray(updates[k], np.float64) / -0.1 for k in keys]
  threshold = float(optax.tree_utils.tree_get(state, "threshold"))
  np.testing.assert_allclose(threshold, np.max(np.abs(np.concatenate(
      [d.ravel() for d in direction]))), rtol=1e-6)
  # With both clips, each records its own: tree_get_all_with_path lists the two.
  tx = optclip.lion(0.1, clip=0.3, clip_update=0.5)
  _, state = tx.update(grads[0], tx.init(params[0]), params[0])
  found = optax.tree_utils.tree_get_all_with_path(state, "threshold")
  assert len(found) == 2
  tau = oracles.threshold([grads[0][k] for k in keys], 0.3)
  assert float(optax.tree_utils.tree_get(state.__getitem__(0).clip, "threshold")) == tau


OPTAX_NAMES = {
    "sgd": (lambda: optclip.sgd(0.1), lambda: optax.sgd(0.1)),
    "sgd momentum": (lambda: optclip.sgd(0.1, 0.9), lambda: optax.sgd(0.1, 0.9)),
    "sgd nesterov": (lambda: optclip.sgd(0.1, 0.9, nesterov=True),
                     lambda: optax.sgd(0.1, 0.9, nesterov=True)),
    "sgd bfloat16 trace": (lambda: optclip.sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16),
                           lambda: optax.sgd(0.1, 0.9, accumulator_dtype=jnp.bfloat16)),
    "sign_sgd": (lambda: optclip.sign_sgd(0.1), lambda: optax.sign_sgd(0.1)),
    "signum": (lambda: optclip.signum(0.1, 0.8), lambda: optax.signum(0.1, 0.8)),
}


@pytest.mark.parametrize("name", sorted(OPTAX_NAMES))
def test_a_name_optax_has_means_what_optax_means(name):
  """Unclipped, an optimizer optax also has gives optax's updates bit for bit, defaults
  included (optclip.sgd(η) has no momentum, as optax.sgd(η))."""
  ours, theirs = (make() for make in OPTAX_NAMES[name])
  keys, params, grads = _problem("mlp", seed=6)
  got, want = _run(ours, params, grads), _run(theirs, params, grads)
  for g, w in zip(got, want):
    chex.assert_trees_all_equal(g, w)
  assert (jax.tree.structure(ours.init(params[0]))
          == jax.tree.structure(theirs.init(params[0])))


def test_sgd_dampening_follows_pytorch():
  """m_t = β m_{t-1} + (1 - d) ĝ_t from m₀ = 0, and m₁ = ĝ₁ with momentum_start="gradient"
  (torch.optim.SGD's rule), transcribed in NumPy; Nesterov refuses a dampening, as PyTorch."""
  keys, params, grads = _problem("mlp", seed=7)
  for start in ("zero", "gradient"):
    got = _as_lists(keys, _run(optclip.sgd(0.1, 0.8, dampening=0.3, momentum_start=start),
                               params, grads))
    m = None
    for step_got, g in zip(got, _as_lists(keys, grads)):
      if m is None:
        m = g if start == "gradient" else [0.7 * x for x in g]
      else:
        m = [0.8 * mi + 0.7 * x for mi, x in zip(m, g)]
      for leaf_got, mi in zip(step_got, m):
        np.testing.assert_allclose(leaf_got, -0.1 * mi, rtol=2e-6, atol=1e-8)
  with pytest.raises(ValueError, match="dampening"):
    optclip.sgd(0.1, 0.9, nesterov=True, dampening=0.5)
