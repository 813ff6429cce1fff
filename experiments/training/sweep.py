"""Many training runs of one optimizer in one compiled program: a learning-rate sweep.

Copies of (parameters, optimizer state) lie along a leading axis; each copy has its own
learning rate (a traced hyperparameter, `optax.inject_hyperparams`) and its own batches
(its seed's training subset and order), and one jitted, vmapped step advances all of them.
Every program of a sweep has the same number of copies, so one compile serves every call
of a (task, optimizer). A copy is an independent run: `train_copies` equals training each
copy alone (tests/test_convergence.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import microbatch
from optclip.data import batching


class Run(NamedTuple):
  """One copy: its learning rate and the seed of its data (subset and batch order)."""
  learning_rate: float
  seed: int


class Curves(NamedTuple):
  """What a call measured, one row per copy."""
  epoch_losses: np.ndarray  # (copies, epochs): the epoch's mean training loss (the paper's log)
  start_loss: np.ndarray  # (copies,): the loss on the evaluation data (default: the whole
  #                         training subset) before training
  final_loss: np.ndarray  # (copies,): the same after the last epoch


def batches(train: dict, batch_size: int, seed: int, epoch: int):
  """The epoch's batches of ``train`` in the seed's order (the tail that does not fill a
  batch is left out), as `experiments.tasks.Task.epoch_batches` draws them."""
  size = len(next(iter(train.values())))
  order = batching.epoch_order(size, seed, epoch)
  for b in range(size // batch_size):
    index = np.sort(order[b * batch_size:(b + 1) * batch_size])
    yield {k: v[index] for k, v in train.items()}


def programs(loss_fn, tx: optax.GradientTransformation):
  """(init, step, evaluate), jitted and vmapped over copies (build them once per (model,
  optimizer) and pass them to `train_copies`: the compile is the costly part); ``loss_fn``
  is a loss function or an `optclip.microbatch.Objective` (micro-batched steps).

  ``init(params, rates)`` gives the copies' states from their stacked parameters (each
  state's learning rate set); ``step(states, batches)`` one step of every copy (donated);
  ``evaluate(params, data)`` each copy's loss on its own ``data``.
  """
  def init(params, rates):
    def one(params, rate):
      state = tx.init(params)
      hyperparams = dict(state.hyperparams)
      hyperparams["learning_rate"] = jnp.asarray(rate, jnp.float32)
      return params, state._replace(hyperparams=hyperparams)
    return jax.vmap(one)(params, rates)

  objective = microbatch.as_objective(loss_fn)

  def one_step(state, batch):
    params, opt_state = state
    loss, grads = objective.value_and_grad(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def evaluate(params, data):
    size = len(jax.tree.leaves(data)[0])
    whole = objective if not objective.microbatch_size or size % objective.microbatch_size \
        == 0 else objective._replace(microbatch_size=0)
    return whole.value(params, data)

  return (jax.jit(init), jax.jit(jax.vmap(one_step), donate_argnums=0),
          jax.jit(jax.vmap(evaluate)))


def train_copies(compiled, params_of: Callable[[int], object], train_of: Callable[[int], dict],
                 runs: Sequence[Run], *, epochs: int, batch_size: int,
                 evaluate_of: Callable[[int], dict] | None = None) -> Curves:
  """Trains every run at once with ``compiled`` = `programs` of a loss and an
  `optax.inject_hyperparams` optimizer with a ``learning_rate``; a run starts from
  ``params_of(seed)`` and trains on ``train_of(seed)`` ({field: (N, ...)}, the same N for
  every seed). The start and final losses are on ``evaluate_of(seed)`` (default: the training
  subset). A run whose loss turns non-finite stays so (nothing else is affected)."""
  init, step, evaluate = compiled
  seeds = sorted({r.seed for r in runs})
  data = {seed: train_of(seed) for seed in seeds}
  starts = {seed: params_of(seed) for seed in seeds}
  stacked = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
  whole = stacked([(evaluate_of or train_of)(r.seed) for r in runs])
  states = init(stacked([starts[r.seed] for r in runs]),
                jnp.asarray([r.learning_rate for r in runs], jnp.float32))
  start = np.asarray(evaluate(states[0], whole), np.float64)
  losses = []
  for epoch in range(epochs):
    epoch_losses = []
    for batch in zip(*(batches(data[r.seed], batch_size, r.seed, epoch) for r in runs)):
      states, loss = step(states, stacked(batch))
      epoch_losses.append(loss)
    losses.append(np.mean(np.asarray(jax.device_get(epoch_losses), np.float64), axis=0))
  final = np.asarray(evaluate(states[0], whole), np.float64)
  return Curves(np.stack(losses, axis=1) if losses else np.zeros((len(runs), 0)), start,
                final)
