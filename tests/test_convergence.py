"""The learning-rate sweep: the vectorised trainer against separate runs, and the verdict
rules on constructed pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.training import loop, sweep
from experiments.training.variants import Variant


def _problem():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) * 0.3,
            "b": jnp.zeros(3)}

  def loss_fn(p, batch):
    logits = jnp.tanh(batch["x"] @ p["w"] + p["b"])
    return jnp.mean((logits - batch["y"]) ** 2)

  def train_of(seed):
    data_rng = np.random.default_rng(seed)
    x = data_rng.standard_normal((24, 6)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, :3] * 0.7).astype(np.float32)}
  return params, loss_fn, train_of


def _alone(loss_fn, tx, params, data, seed, epochs, batch_size):
  """(epoch mean losses, final params) of one run with the ordinary training loop."""
  step = loop.train_step(loss_fn, tx)
  state = loop.initial_state(tx, params)
  losses = []
  for epoch in range(epochs):
    epoch_losses = []
    for batch in sweep.batches(data, batch_size, seed, epoch):
      state, loss = step(state, batch)
      epoch_losses.append(float(loss))
    losses.append(np.mean(epoch_losses))
  return losses, state.params


def test_vectorised_sweep_equals_separate_runs():
  """Every copy of one compiled program (its own rate and data) trains as that run alone
  with the ordinary loop: within 1e-5 with the same (rate-injected) optimizer (vmapped
  products round differently, and a rate of 3 amplifies it), and
  within 1e-4 of the plain one (whose rate is a constant folded differently; the clip
  amplifies that rounding over the steps)."""
  params, loss_fn, train_of = _problem()
  runs = [sweep.Run(0.05, 1), sweep.Run(0.3, 1), sweep.Run(0.3, 2), sweep.Run(3.0, 2)]
  for variant in (Variant("adam"), Variant("adam", clip=0.5), Variant("sgd", clip=0.1)):
    compiled = sweep.programs(loss_fn, variant.make(1.0, tunable=True))
    curves = sweep.train_copies(compiled, lambda seed: params, train_of, runs, epochs=3,
                                batch_size=8)
    for index, run in enumerate(runs):
      data = train_of(run.seed)
      for tunable, rtol in ((True, 1e-5), (False, 1e-4)):
        losses, final = _alone(loss_fn, variant.make(run.learning_rate, tunable=tunable),
                               params, data, run.seed, 3, 8)
        np.testing.assert_allclose(curves.epoch_losses[index], losses, rtol=rtol,
                                   err_msg=f"{variant.label} {run} tunable={tunable}")
        np.testing.assert_allclose(curves.final_loss[index], float(loss_fn(final, data)),
                                   rtol=rtol)
      np.testing.assert_allclose(curves.start_loss[index], float(loss_fn(params, data)),
                                 rtol=1e-6)
