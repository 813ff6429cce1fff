"""The one training loop every experiment uses: a donated optax step and an epoch runner
(prefetch, progress bar, orbax checkpoints, resume)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.artifacts import checkpoints
from optclip import microbatch
from optclip.data.batching import prefetch


def model_loss(model, mesh=None, mode: str = "train") -> Callable:
  """``loss_fn(params, batch)`` of a model (``mode="eval"``: BatchNorm on its running
  statistics, which the batch carries; see `optclip.models.make_loss_fn`); on a mesh
  FSDP-style (`sharding.gathered_loss`)."""
  from optclip.models import make_loss_fn
  from optclip.sharding import gathered_loss
  loss_fn = make_loss_fn(model, mode)
  return loss_fn if mesh is None else gathered_loss(loss_fn)


def model_objective(model, mesh=None, mode: str = "train", microbatch_size: int = 0,
                    remat: str = ""):
  """The model's loss as an `optclip.microbatch.Objective`, micro-batched by
  ``microbatch_size`` examples and rematerialised per block with policy ``remat`` (for the
  reverse-mode programs); on a mesh FSDP-style (`sharding.gathered_loss`)."""
  from optclip.models import make_objective
  from optclip.sharding import gathered_loss
  if remat:
    model = model.clone(remat=remat)
  objective = make_objective(model, mode, microbatch_size)
  if mesh is None:
    return objective
  return objective._replace(loss=gathered_loss(objective.loss),
                            loss_sum=objective.loss_sum and gathered_loss(objective.loss_sum))


def model_state_loss(model, mesh=None) -> Callable | None:
  """``(params, model_state, batch) -> (loss, model_state)`` of a model with state (ResNet's
  BatchNorm statistics), else None; on a mesh FSDP-style."""
  from optclip.models import make_state_loss_fn
  loss_fn = make_state_loss_fn(model)
  if loss_fn is None or mesh is None:
    return loss_fn

  def sharded(params, model_state, batch):
    replicated = jax.tree.map(lambda x: jax.sharding.reshard(x, jax.sharding.PartitionSpec()),
                              params)
    return loss_fn(replicated, model_state, batch)
  return sharded


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  model_state: Any = None  # what a model keeps besides its parameters (BatchNorm statistics)


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays or `jax.ShapeDtypeStruct`s (what a state would take)."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def train_step(loss_fn, tx, state_loss_fn: Callable | None = None, *,
               probe_outputs: Callable | None = None) -> Callable:
  """Jitted ``(state, batch) -> (state, loss)``: one optax step of ``tx`` on ``loss_fn`` (a
  loss function, or an `optclip.microbatch.Objective`, then summed over micro-batches), or
  on ``state_loss_fn(params, model_state, batch) -> (loss, model_state)`` for a model with
  state (which then advances too; see `model_state_loss`).

  With ``probe_outputs`` (``tx`` from `optclip.probes`), the step also returns every
  probe's update, stacked, and ``probe_outputs(new opt_state)``: what `probe_step` returns,
  from the same compiled program.

  The state is donated, so XLA updates parameters and moments in place rather than
  allocating fresh buffers every step (16% of a GPT-Neo-125M step on CPU); callers rebind it
  to the result and start from `initial_state`.
  """
  objective = microbatch.as_objective(loss_fn)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch):
    if state_loss_fn is None:
      loss, grads = objective.value_and_grad(state.params, batch)
      model_state = state.model_state
    else:
      (loss, model_state), grads = jax.value_and_grad(state_loss_fn, has_aux=True)(
          state.params, state.model_state, batch)
    if probe_outputs is None:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates), opt_state,
                        model_state), loss
    updates, opt_state, probe_updates = tx.update_with_probes(grads, state.opt_state,
                                                              state.params)
    return (TrainState(optax.apply_updates(state.params, updates), opt_state, model_state),
            loss, probe_updates, probe_outputs(opt_state))

  return step


def probe_step(loss_fn, tx, read_state: Callable) -> Callable:
  """Jitted ``(state, batch) -> (probe_updates, read_state(opt_state))``: the step ``tx``
  (from `optclip.probes`) would take from ``state``, not taken.

  ``probe_updates`` are every probe optimizer's updates, stacked; of the optimizer state the
  step would leave only ``read_state``'s part is returned, so neither it nor a copy of
  ``state`` is ever held (at GPT-Neo-125M with the experiments' 20 probe optimizers each
  would be 12.2 GiB). Nothing is donated. ``loss_fn`` as in `train_step`.
  """
  objective = microbatch.as_objective(loss_fn)

  @jax.jit
  def step(state: TrainState, batch):
    grads = objective.grad(state.params, batch)  # training mode, as the step it mirrors
    _, opt_state, probe_updates = tx.update_with_probes(grads, state.opt_state, state.params)
    return probe_updates, read_state(opt_state)

  return step


def initial_state(tx, params, place=lambda tree: tree, model_state=None) -> TrainState:
  """``TrainState(params, tx.init(params), model_state)`` placed by ``place``, on buffers of
  its own.

  The copy matters because the step donates its state while the initial parameters may
  alias arrays that must survive, such as a --checkpoint folder's, which every seed starts
  from.
  """
  params = place(params)
  return jax.tree.map(jnp.copy, place(TrainState(params, tx.init(params), model_state)))


class Checkpointing(NamedTuple):
  """Save the state at the end of ``epochs`` as checkpoints/<unit>/<epoch>; resume from the
  newest. ``after_save(unit, epoch)``, if given, runs after each save (tests use it to kill
  a run at a known point)."""
  out: str
  unit: str
  epochs: frozenset
  after_save: Callable | None = None


def progress(iterable=None, **kwargs):
  from tqdm.auto import tqdm
  kwargs.setdefault("leave", False)
  kwargs.setdefault("dynamic_ncols", True)
  kwargs.setdefault("disable", os.environ.get("OPTCLIP_NO_PROGRESS") == "1")
  return tqdm(iterable, **kwargs)


def run_epochs(step: Callable, state: TrainState, epoch_batches: Callable[[int], Iterable],
               epochs: int, *, steps_per_epoch: int, place_batch=lambda batch: batch,
               checkpointing: Checkpointing | None = None,
               on_epoch_start: Callable | None = None, on_epoch_end: Callable | None = None,
               on_losses: Callable | None = None, description: str = "") -> TrainState:
  """Trains ``epochs`` epochs of ``epoch_batches(epoch)`` with ``step`` (any further
  outputs of a step after ``(state, loss)`` are dropped).

  ``on_epoch_start(epoch, state)`` runs before epoch ``epoch`` (0-based);
  ``on_losses(first_step, losses)`` gets an epoch's per-step losses once it is over (the
  live view: reading them step by step would make every step wait for the device);
  ``on_epoch_end(epoch, state, mean_loss)`` after it (``epoch`` counts the epochs done) and
  before its checkpoint; if it returns a state, training goes on from that one (equal in
  value: the callback may have moved buffers). With ``checkpointing`` a run resumes after
  its newest checkpoint.
  """
  start = 0
  if checkpointing is not None:
    start, state = checkpoints.restore_latest(checkpointing.out, checkpointing.unit, state)
  bar = progress(total=(epochs - start) * steps_per_epoch, desc=description)
  for epoch in range(start, epochs):
    if on_epoch_start is not None:
      on_epoch_start(epoch, state)
    losses = []
    for batch in prefetch(map(place_batch, epoch_batches(epoch))):
      state, loss = step(state, batch)[:2]
      losses.append(loss)
      bar.update()
    losses = jax.device_get(losses)
    mean_loss = float(np.mean(losses))
    bar.set_postfix(loss=f"{mean_loss:.4f}")
    if on_losses is not None:
      on_losses(epoch * steps_per_epoch, losses)
    if on_epoch_end is not None:
      state = on_epoch_end(epoch + 1, state, mean_loss) or state
    if checkpointing is not None and epoch + 1 in checkpointing.epochs:
      checkpoints.save(checkpointing.out, checkpointing.unit, epoch + 1, state)
      if checkpointing.after_save is not None:
        checkpointing.after_save(checkpointing.unit, epoch + 1)
  bar.close()
  return state
