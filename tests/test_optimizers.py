"""The optimizer family against NumPy transcriptions of Algorithms 3-9, and against optax."""


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
    "sgd": (lambda c, cu: optclip.sgd(0.1, 0.9, clip=c),
            lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c)),
    "normalized_sgd": (lambda c, cu: optclip.normalized_sgd(0.1, 0.9, clip=c),
                       lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c, normalize=True)),
    "sign_sgd": (lambda c, cu: optclip.sign_sgd(0.1, 0.9, clip=c),
                 lambda g, p, c, cu: oracles.sgd(g, 0.1, 0.9, c, sign=True)),
    "adam": (lambda c, cu: optclip.adam(0.1, clip=c, clip_update=cu),
             lambda g, p, c, cu: oracles.adam(g, 0.1, 0.9, 0.999, 1e-8, c, cu)),
    "lion": (lambda c, cu: optclip.lion(0.1, clip=c, clip_update=cu),
             lambda g, p, c, cu: oracles.lion(g, 0.1, 0.9, 0.99, c, cu)),
    "adafactor_relative": (lambda c, cu: optclip.adafactor(None, clip=c),
                           lambda g, p, c, cu: oracles.adafactor(g, p, None, c)),
    "adafactor_fixed": (lambda c, cu: optclip.adafactor(0.05, clip=c),
                        lambda g, p, c, cu: oracles.adafactor(g, p, 0.05, c)),
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


@pytest.mark.parametrize("problem", ["mlp", "heavy_tailed"])
def test_adam_equals_optax_adam(problem):
  keys, params, grads = _problem(problem, seed=1)
  chex.assert_trees_all_close(_run(optclip.adam(1e-3), params, grads),
                              _run(optax.adam(1e-3), params, grads), rtol=0, atol=0)


@pytest.mark.parametrize("problem", ["mlp", "heavy_tailed"])
def test_lion_equals_optax_lion(problem):
  keys, params, grads = _problem(problem, seed=2)
  chex.assert_trees_all_close(_run(optclip.lion(1e-3), params, grads),
                              _run(optax.lion(1e-3, weight_decay=0.0), params, grads),
                              rtol=0, atol=0)


def test_clip_feeds_only_the_first_moment():
  # With clipping, Adam's nu must equal the unclipped run's nu (raw gradient).
  keys, params, grads = _problem("heavy_tailed", seed=3)
  def final_state(tx):
    state = tx.init(params[0])
    for g in grads:
      _, state = tx.update(g, state)
    return state[0]
  clipped, plain = final_state(optclip.adam(0.1, clip=0.1)), final_state(optclip.adam(0.1))
  chex.assert_trees_all_close(clipped.nu, plain.nu)
  assert not np.allclose(clipped.mu["emb"], plain.mu["emb"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_learning_rate_and_no_recompile(name):
  keys, params, grads = _problem("mlp", seed=4)
  schedule = optax.linear_schedule(0.1, 0.01, 3)
  factories = {
      "sgd": lambda: optclip.sgd(schedule, clip=0.1),
      "normalized_sgd": lambda: optclip.normalized_sgd(schedule, clip=0.1),
      "sign_sgd": lambda: optclip.sign_sgd(schedule),
      "adam": lambda: optclip.adam(schedule, clip=0.5),
      "lion": lambda: optclip.lion(schedule, clip_update=0.5),
      "adafactor_relative": lambda: optclip.adafactor(None, clip=0.5),
      "adafactor_fixed": lambda: optclip.adafactor(schedule, clip=0.5),
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
