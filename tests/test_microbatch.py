"""Micro-batched programs equal one-shot ones: the loss (normalised by the whole batch's
kept tokens, with padding that differs between micro-batches), its gradient, directional
sharpness by jet, forward and hvp, Hessian-vector products, the landscape, per-example
gradients and Gauss-Newton products; rematerialisation changes no value."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching
import pytest

import optclip
import optclip.models as models
from optclip import curvature, geometry
from optclip.microbatch import Objective

RTOL = 1e-5


def _t5_batch():
  """Four examples whose target padding differs (1 to 7 kept tokens): two micro-batches of
  two have different token counts, so a mean of micro-batch means would be wrong."""
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 60, (4, 6)).astype(np.int32)
  labels = rng.integers(2, 60, (4, 8)).astype(np.int32)
  for row, kept in enumerate((1, 7, 3, 8)):
    labels[row, kept:] = -100
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _gpt_batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(2, 60, (4, 8)).astype(np.int32)
  labels = ids.copy()
  labels[0, 5:] = -100  # a padded document
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


CASES = {"t5-micro": _t5_batch, "gpt-neo-micro": _gpt_batch}


def _setup(name):
  model = models.create(name, vocab_size=64)
  params = models.init_params(model, jax.random.PRNGKey(0))
  return model, params, CASES[name]()


def _close(a, b, rtol=RTOL, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# T5 (micro-batches of different token counts) in the default suite; GPT-Neo (28 s) is slow.
@pytest.mark.parametrize("name", [
    n if n == "t5-micro" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_loss_and_gradient(name):
  model, params, batch = _setup(name)
  one_shot = models.make_objective(model)
  split = models.make_objective(model, microbatch_size=2)
  if name == "t5-micro":  # the micro-batches' token counts differ
    counts = [int(np.sum(batch["labels"][i:i + 2] != -100)) for i in (0, 2)]
    assert counts[0] != counts[1]
  value, grads = jax.jit(one_shot.value_and_grad)(params, batch)
  loss_fn = jax.jit(models.make_loss_fn(model))  # op by op, T5's forward takes seconds
  np.testing.assert_allclose(float(value), float(loss_fn(params, batch)), rtol=1e-6)
  split_value, split_grads = jax.jit(split.value_and_grad)(params, batch)
  np.testing.assert_allclose(float(split_value), float(value), rtol=RTOL)
  _close(split_grads, grads)
  # A mean of micro-batch means is not the loss where the counts differ.
  if name == "t5-micro":
    means = [float(loss_fn(params, {k: v[i:i + 2] for k, v in batch.items()}))
             for i in (0, 2)]
    assert abs(np.mean(means) - float(value)) > 1e-3


@pytest.mark.slow  # long on 2 cores (45-210 s): outside the default suite's budget
@pytest.mark.parametrize("name", sorted(CASES))
def test_second_order_probes(name):
  model, params, batch = _setup(name)
  one_shot = models.make_objective(model)
  split = models.make_objective(model, microbatch_size=2)
  key = jax.random.PRNGKey(3)
  direction = jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), params)
  for method in ("jet", "forward", "hvp"):
    op = lambda f: geometry.second_derivative(f, params, direction, method)
    np.testing.assert_allclose(float(jax.jit(lambda b: split.apply(op, b))(batch)),
                               float(jax.jit(lambda b: one_shot.apply(op, b))(batch)),
                               rtol=RTOL, err_msg=method)
  hvp = lambda f: curvature.hessian_vector_product(f, params, direction)
  _close(jax.jit(lambda b: split.apply(hvp, b))(batch),
         jax.jit(lambda b: one_shot.apply(hvp, b))(batch), atol=1e-6)
  stacked = jax.tree.map(lambda d: jnp.stack([d, -0.5 * d]), direction)
  steps = jnp.asarray([0.0, 0.1, 1.0])
  land = lambda f: optclip.landscape(f, params, stacked, steps, batch_size=1)
  _close(jax.jit(lambda b: split.apply(land, b))(batch),
         jax.jit(lambda b: one_shot.apply(land, b))(batch))


def test_per_example_gradients_and_gauss_newton_products():
  """Per-example gradients concatenated over micro-batches, and the Gauss-Newton product
  JᵀHJv summed over them, equal their one-shot values (a binary classifier, as Table 8)."""
  from optclip.microbatch import concatenated, summed
  model = models.create("bert-micro", vocab_size=64)
  params = models.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  ids = rng.integers(2, 60, (6, 8)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "label": rng.integers(0, 2, 6).astype(np.int32)}
  from optclip.models import bert
  per_example = lambda b: jax.vmap(lambda e: jax.grad(
      lambda p: bert.per_example_logit_margin(model, p, jax.tree.map(lambda x: x[None], e))[0]
  )(params))(b)
  _close(jax.jit(lambda b: concatenated(per_example, b, 2))(batch),
         jax.jit(per_example)(batch), atol=1e-6)
  vector = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)

  def gauss_newton(b):  # the summed cross-entropy of the batch, through its logits
    return curvature.gauss_newton_vector_product(
        lambda p: bert.logits_fn(model, p, b),
        lambda z: -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(z.shape[0]), b["label"]]),
        params, vector)
  _close(jax.jit(lambda b: summed(gauss_newton, b, 3))(batch), jax.jit(gauss_newton)(batch),
         atol=1e-6)


@pytest.mark.parametrize("name", ["t5-micro", "gpt-neo-micro", "bert-micro"])
def test_remat_changes_no_value(name):
  model = models.create(name)
  params = models.init_params(model, jax.random.PRNGKey(0))
  batch = models.family(model).dummy_batch(model.config, 2, 8)
  rematted = model.clone(remat="nothing")
  assert jax.tree.structure(models.init_params(rematted, jax.random.PRNGKey(0))) == \
      jax.tree.structure(params)
  for m in (model, rematted):
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: models.make_loss_fn(m)(p, batch)))(params)
    if m is model:
      reference = value, grads
  np.testing.assert_array_equal(float(value), float(reference[0]))
  _close(grads, reference[1], rtol=1e-6)


def test_a_microbatch_that_does_not_divide_is_refused_naming_the_sizes_that_do():
  model, params, batch = _setup("t5-micro")
  with pytest.raises(ValueError, match=r"microbatch_size=3 .* batch of 4; sizes that do: "
                                       r"\[1, 2, 4\]"):
    models.make_objective(model, microbatch_size=3).value(params, batch)
  resnet = models.create("resnet-tiny")
  with pytest.raises(ValueError, match="not a sum over examples"):
    models.make_objective(resnet, "train", microbatch_size=2)
  assert models.make_objective(resnet, "eval", microbatch_size=2).microbatch_size == 2
