"""One training trajectory with pseudo-update probes (Appendix B.3), shared by the sharpness,
landscape, histogram, rmed and resnet experiments.

Training follows SGD-momentum or Adam, itself one of the probe optimizers
(`optclip.probes.following`): every step's gradient goes to the states of all probe
optimizers, whose updates are computed but never applied except the followed one's. At the
end of each probe epoch the point x is frozen, each probe optimizer's would-be update at x is
formed from the gradient of the next training batch, and everything in
`experiments.probing.measurements` is measured on the fixed probe batch (Appendix B.3's
"test batch"). One record per probe point goes to metrics.jsonl; the training state is saved
with orbax at every probe point, so ``--resume`` continues from the last one.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import optclip
from experiments import host_memory
from experiments.artifacts import checkpoints
from experiments.probing import measurements, pilot
from experiments.probing.probes import PROBES, TRAJECTORIES, train_transform
from experiments.training import loop
from optclip import curvature

EXPERIMENT = "trajectory"
TRANSFORMER_TASKS = ("translation", "code")


def steps(task, kind: str, preset, mesh=None, trajectory: str = TRAJECTORIES[0]) -> tuple:
  """(train step, directions): the jitted training step of every trajectory, rate and seed
  of a task (they differ only in the state; with ``preset.static_follow`` one step per
  ``trajectory``), and ``directions(state, batch) -> (probe updates, clip statistics)``,
  every probe's update of the next step from ``state`` (not taken) and what the clipped
  probes' clips did in it. Cached on what they read."""
  return _steps(task.model, kind, preset.fused_probe_step, task.preset.microbatch_size,
                task.preset.remat, mesh, trajectory if preset.static_follow else None)


@functools.lru_cache(maxsize=None)
def _steps(model, kind, fused: bool, microbatch_size: int, remat: str, mesh,
           static_trajectory: str | None = None):
  if static_trajectory is None:
    tx = train_transform(TRAJECTORIES[0], 1.0, kind)
  else:
    tx = train_transform(static_trajectory, 1.0, kind, static=True)
  state_loss = loop.model_state_loss(model, mesh)
  # A model with batch statistics (the ResNet's BatchNorm) trains on the whole batch: its
  # training loss is not a sum over examples. Its probes (evaluation mode) micro-batch.
  objective = loop.model_objective(model, mesh, "train",
                                   0 if state_loss is not None else microbatch_size, remat)
  read_state = functools.partial(_clip_statistics, names=tuple(tx.probes))
  if fused:
    # One program for training and probe points (the quick presets, where the 20 stacked
    # updates every step returns are small): the directions are the outputs of a step taken
    # on a copy of the state (the step donates its input).
    step = loop.train_step(objective, tx, state_loss, probe_outputs=read_state)
    return step, lambda state, batch: step(jax.tree.map(jnp.copy, state), batch)[2:]
  return (loop.train_step(objective, tx, state_loss),
          loop.probe_step(objective, tx, read_state))


def _programs(task, kind, preset, mesh=None) -> measurements.Programs:
  """The probe programs, on the loss in evaluation mode (BatchNorm on its running
  statistics, as the paper's code measures after ``model.eval()``)."""
  return _compiled_programs(task.model, kind, tuple(preset.landscape_steps),
                            preset.lanczos_iterations, preset.landscape_batch,
                            task.preset.microbatch_size, task.preset.remat, mesh,
                            preset.block_spectrum_steps, preset.block_spectrum_samples)


@functools.lru_cache(maxsize=None)
def _compiled_programs(model, kind, steps, lanczos_iterations, landscape_batch,
                       microbatch_size, remat, mesh, block_spectrum_steps,
                       block_spectrum_samples):
  """`_programs`, cached on exactly what the programs read."""
  objective = lambda remat: loop.model_objective(model, mesh, "eval", microbatch_size, remat)
  return measurements.make_programs(
      objective(""), [v.label for v in PROBES[kind]], steps, lanczos_iterations,
      landscape_batch=landscape_batch, reverse=objective(remat),
      block_spectrum_steps=block_spectrum_steps,
      block_spectrum_samples=block_spectrum_samples)


# The Adam probe's own settings (optclip.adam's defaults, as `probe_optimizers` builds it).
ADAM_B2, ADAM_EPS = 0.999, 1e-8


@jax.jit
def _adam_preconditioner(adam_state):
  return curvature.adam_preconditioner(adam_state, b2=ADAM_B2, eps=ADAM_EPS)


def probe_batch(test_batch, state):
  """The probe batch, with the model's state where it has one (the evaluation-mode loss
  reads BatchNorm's running statistics from it)."""
  if state.model_state is None:
    return test_batch
  return {**test_batch, "model_state": state.model_state}


def curvature_sample(params, size: int, seed: int) -> dict:
  """A fixed random sample of ``size`` coordinates per leaf (all of a smaller leaf), drawn
  once from the seed: {leaf path: sorted flat indices}."""
  rng = np.random.default_rng([seed, 2002])
  sample = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    count = min(size, leaf.size)
    sample[jax.tree_util.keystr(path)] = np.sort(rng.choice(leaf.size, count, replace=False))
  return sample


def _clip_statistics(opt_state, names) -> dict:
  """{label: what its clip did} for the clipped probes (the clip of this probe's update)."""
  out = {}
  for name in names:
    clips = [c for c in jax.tree.leaves(opt_state.probes[name],
                                        is_leaf=lambda x: isinstance(x, optclip.CoordClipState))
             if isinstance(c, optclip.CoordClipState)]
    if clips:
      out[name] = {f: getattr(clips[0], f) for f in ("threshold", "clipped_fraction",
                                                     "norm_before", "norm_after")}
  return out


# Optimizer states of more than this share of a device's memory wait off the device while a
# probe point runs (see `_worth_setting_aside`).
SET_ASIDE_ABOVE = 1 / 16


def _device_memory_bytes() -> int:
  """What one device holds: its allocator's limit on an accelerator; the host's RAM on a
  CPU, where all devices share it."""
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  return limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _worth_setting_aside(opt_state, memory_bytes: int | None = None) -> bool:
  """Whether ``opt_state`` (per device) is over `SET_ASIDE_ABOVE` of ``memory_bytes``
  (default `_device_memory_bytes`).

  The probe programs read the parameters and the directions, never the optimizer states,
  and the paper's code keeps its pseudo-optimizers' states in host memory throughout. So
  they go off the device during a probe point wherever they are big enough to matter; the
  quick preset's few MiB stay, as the round trip would only cost time. The size of the
  states alone decides: the probe programs' own temporaries are not known before they are
  compiled. (The earlier rule, states and directions over half the memory, kept t5-small's
  5.6 GiB of states beside its 4.5 GiB of directions on a 23.5 GiB host. The probe point's
  temporaries and the process's own memory then took the peak to 22.6 GiB, and it was
  killed.)
  """
  memory_bytes = memory_bytes or _device_memory_bytes()
  held = sum(shard.data.nbytes for leaf in jax.tree.leaves(opt_state)
             for shard in leaf.addressable_shards)
  if jax.local_devices()[0].platform != "cpu":  # each device has its own memory
    held /= len(jax.local_devices())
  return held > memory_bytes * SET_ASIDE_ABOVE


def run(ctx, task, trajectory: str, seed: int, *, kind: str = "transformer",
        epochs: int | None = None, probe_epochs=None, learning_rate: float | None = None,
        model_name: str | None = None) -> None:
  """Trains one (task, trajectory, seed) unit and logs a record per probe epoch
  (``model_name``, where given, joins the unit's name and records).

  With a mesh in ``ctx``, parameters and optimizer states are FSDP-sharded over its ``fsdp``
  axis and batches split over ``data``; checkpoints restore onto whatever mesh is given.
  """
  from optclip import sharding
  preset, metrics = ctx.preset, ctx.metrics
  epochs = epochs or preset.epochs
  probe_epochs = tuple(probe_epochs or preset.probe_epochs)
  unit = "-".join([kind, task.name] + ([model_name] if model_name else [])
                  + [trajectory, f"seed{seed}"])
  if metrics.has(f"{unit}/done"):
    return
  learning_rate = learning_rate or pilot.learning_rate(ctx, task.name, trajectory, kind=kind,
                                                       epochs=epochs, model_name=model_name)
  context, place, place_batch = sharding.placement(ctx.mesh)
  # What the previous unit's programs and states left in the heap (at t5-small's full size
  # the second trajectory started 19.3 GiB resident, against 14 GiB for the first).
  host_memory.return_freed()
  fields = dict(kind=kind, task=task.name, trajectory=trajectory, seed=seed,
                **({"model": model_name} if model_name else {}))
  with context:
    step, directions = steps(task, kind, preset, ctx.mesh, trajectory)
    programs = _programs(task, kind, preset, ctx.mesh)
    tx = train_transform(trajectory, learning_rate, kind)
    names = list(tx.probes)
    params = task.init_params(seed)
    sample = curvature_sample(params, preset.curvature_samples, seed)
    state = loop.initial_state(tx, params, place, task.init_model_state(seed))
    test_batch = place_batch(task.test_batch)
    if not metrics.has(f"{unit}/epoch0/start"):
      start_loss = loop.model_loss(task.model, ctx.mesh, mode="eval")(
          state.params, probe_batch(test_batch, state))
      metrics.log(EXPERIMENT, f"{unit}/epoch0/start", **fields, epoch=0,
                  probe_loss=float(start_loss), learning_rate=learning_rate,
                  parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))))

    def on_epoch_end(epoch, state, train_loss):
      metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/train", **fields, epoch=epoch,
                  train_loss=train_loss)
      if epoch in probe_epochs:
        # The directions: the step on the next training batch from x, not taken (the
        # trajectory itself goes on unchanged).
        next_batch = place_batch(next(task.epoch_batches(seed, epoch)))
        host_memory.return_freed()  # what compiling and training left in the heap
        stacked, clip_statistics = directions(state, next_batch)
        # Read before the states may go to disk: Adam's live P = √v̂ + ε (on the Adam
        # trajectory the Adam probe is the optimizer that trains).
        preconditioner = (_adam_preconditioner(state.opt_state.probes["adam"])
                          if "adam" in names else None)
        # The probe reads only the parameters: large optimizer states wait in host memory or
        # on disk meanwhile (t5-small's 20 probe states are 5.6 GiB); they come back bit for
        # bit.
        bring_back = (checkpoints.set_aside(ctx.out, unit, state.opt_state)
                      if _worth_setting_aside(state.opt_state) else None)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        inputs = dict(params=state.params, directions=stacked, names=names,
                      probe_batch=probe_batch(test_batch, state), key=key, sample=sample,
                      diagonal_here=(preset.curvature_at == "every"
                                     or epoch == probe_epochs[-1]),
                      first_point=epoch == probe_epochs[0],
                      adam_preconditioner=preconditioner, clip_statistics=clip_statistics)
        del stacked  # measured, then freed by `measure`
        result = measurements.measure(programs, inputs, preset)
        metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/probe", **fields, epoch=epoch,
                    algorithms=names, step_sizes=list(preset.landscape_steps),
                    histogram_range=list(measurements.HISTOGRAM_RANGE), **result)
        if bring_back is not None:
          return state._replace(opt_state=bring_back())
      return None

    loop.run_epochs(step, state, lambda epoch: task.epoch_batches(seed, epoch), epochs,
                    steps_per_epoch=task.batches_per_epoch, place_batch=place_batch,
                    checkpointing=ctx.checkpointing(unit, probe_epochs),
                    on_epoch_end=on_epoch_end,
                    on_losses=None if ctx.live is None else functools.partial(ctx.live.losses,
                                                                              unit),
                    description=f"{task.name} {trajectory} seed {seed}")
  metrics.log(EXPERIMENT, f"{unit}/done", **fields)
  checkpoints.discard(ctx.out, unit)


def checkpoint_bytes(task, kind: str = "transformer") -> int:
  """Bytes of one saved step of a unit of ``task``: parameters and every probe optimizer's
  state, as `jax.eval_shape` gives them (nothing is allocated)."""
  state = jax.eval_shape(lambda: loop.initial_state(
      train_transform(TRAJECTORIES[0], 1.0, kind), task.init_params(0)))
  return loop.tree_bytes(state)


def run_transformer_units(ctx) -> None:
  """Both trajectories of both transformer tasks, every seed (what the probe sections read)."""
  for task_name in TRANSFORMER_TASKS:
    for seed in ctx.seeds:
      task = ctx.task(task_name, seed)
      for name in TRAJECTORIES:
        run(ctx, task, name, seed)
