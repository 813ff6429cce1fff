"""One training trajectory with pseudo-update probes (Appendix B.3), shared by the sharpness,
landscape, histogram, rmed and resnet experiments.

Training follows SGD-momentum or Adam; `optclip.probes.with_pseudo_updates` feeds every
step's gradient to the states of all probe optimizers (pseudo-updates, never applied). At
the end of each probe epoch the point x is frozen, each probe optimizer's would-be update at
x is formed from the gradient of the next training batch, and everything is measured on the
fixed test batch: the (robust) directional sharpness, the landscape along every direction,
the gradient correlation, coordinate histograms, the sharpness attribution to SGD's top
coordinates and R_med of the Hessian diagonal. One record per probe point goes to
metrics.jsonl; the training state is saved with orbax at every probe point, so ``--resume``
continues from the last one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import optclip
from experiments import training
from experiments.variants import Variant
from optclip import curvature, geometry, probes

EXPERIMENT = "trajectory"
ROBUST_DELTA = 0.01  # Appendix B, Eq. (4)
ATTRIBUTION_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.5)
HISTOGRAM_BINS = 64
HISTOGRAM_RANGE = (-16.0, 0.0)

# The algorithms of Tables 1 and 4-7 (transformer) and Table 9 (resnet; it clips Adam and
# Adafactor at 10%).
PROBES = {
    "transformer": (
        Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"), Variant("adam", clip=0.5),
        Variant("adam", clip_update=0.5), Variant("adafactor"), Variant("adafactor", clip=0.5),
        Variant("lion"), Variant("lion", clip_update=0.5), Variant("sign sgd"),
        Variant("normalized sgd"), Variant("normalized sgd", clip=0.1)),
    "resnet": (
        Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"), Variant("adam", clip=0.1),
        Variant("adafactor"), Variant("adafactor", clip=0.1), Variant("lion"),
        Variant("sign sgd"), Variant("normalized sgd"), Variant("normalized sgd", clip=0.1)),
}
TRAJECTORIES = {"sgd": Variant("sgd"), "adam": Variant("adam")}


def probe_optimizers(kind: str = "transformer") -> dict:
  """{label: optimizer} with unit learning rates: only the direction of an update matters to
  the probes (sharpness and landscape normalise it). Adafactor keeps its relative step size,
  which scales each leaf by its RMS and so is part of its direction."""
  return {v.label: v.make(None if v.base == "adafactor" else 1.0) for v in PROBES[kind]}


def train_transform(trajectory: str, learning_rate: float, kind: str):
  """The trajectory's optimizer, with every probe optimizer's state following it."""
  return probes.with_pseudo_updates(TRAJECTORIES[trajectory].make(learning_rate),
                                    probe_optimizers(kind))


@functools.lru_cache(maxsize=None)
def _train_step(model, trajectory, learning_rate, kind, mesh=None):
  """The jitted training step, shared by every seed of a task (same shapes, one compile)."""
  return training.train_step(training.model_loss(model, mesh),
                             train_transform(trajectory, learning_rate, kind))


@functools.lru_cache(maxsize=None)
def _probe(model, kind, steps, hutchinson_samples, mesh=None):
  """The probe, shared by both trajectories and every seed of a task.

  Jitted in separate pieces: XLA compiles several small programs faster than one large one.
  """
  loss_fn = training.model_loss(model, mesh)
  tx = train_transform("sgd", 1.0, kind)  # only its probes are used
  names = list(tx.probes)
  steps = jnp.asarray(steps, jnp.float32)

  @jax.jit
  def would_be_updates(params, opt_state, next_batch):
    return probes.pseudo_updates(tx, opt_state, jax.grad(loss_fn)(params, next_batch), params)

  @jax.jit
  def geometry_terms(params, updates, test_batch):
    directions = jax.tree.map(lambda *u: jnp.stack(u), *[updates[n] for n in names])
    test_loss = lambda p: loss_fn(p, test_batch)
    loss, test_grads = jax.value_and_grad(test_loss)(params)
    robust = optclip.directional_sharpness(test_loss, params, directions,
                                           robust_delta=ROBUST_DELTA)
    correlation = jax.vmap(lambda u: optclip.gradient_correlation(test_grads, u))(directions)
    return {"loss": loss, "sharpness": robust.sharpness, "shifted": robust.shifted,
            "landscape": optclip.landscape(test_loss, params, directions, steps),
            "projection": correlation.projection, "cosine": correlation.cosine}

  @jax.jit
  def coordinates(params, updates, test_batch):
    test_loss = lambda p: loss_fn(p, test_batch)
    histograms = {n: geometry.coordinate_histogram(updates[n], HISTOGRAM_BINS, HISTOGRAM_RANGE)
                  for n in ("sgd", "adam", "adafactor")}
    return {"histograms": {n: (h[0], h[2]) for n, h in histograms.items()},
            "attribution": geometry.sharpness_attribution(test_loss, params, updates["sgd"],
                                                          ATTRIBUTION_FRACTIONS)}

  @jax.jit
  def curvature_terms(params, test_batch, key):
    test_loss = lambda p: loss_fn(p, test_batch)
    diagonal = curvature.hessian_diagonal(test_loss, params, method="hutchinson", key=key,
                                          samples=hutchinson_samples)
    return {"r_med": curvature.r_med(diagonal)}

  def probe(params, opt_state, next_batch, test_batch, key):
    updates = would_be_updates(params, opt_state, next_batch)
    return {**geometry_terms(params, updates, test_batch),
            **coordinates(params, updates, test_batch),
            **curvature_terms(params, test_batch, key)}

  return probe


def run(ctx, task, trajectory: str, seed: int, *, kind: str = "transformer",
        epochs: int | None = None, probe_epochs=None, learning_rate: float | None = None
        ) -> None:
  """Trains one (task, trajectory, seed) unit and logs a record per probe epoch.

  With a mesh in ``ctx``, parameters and optimizer states are FSDP-sharded over its ``fsdp``
  axis and batches split over ``data``; checkpoints restore onto whatever mesh is given.
  """
  from optclip import sharding
  preset, metrics = ctx.preset, ctx.metrics
  epochs = epochs or preset.epochs
  probe_epochs = tuple(probe_epochs or preset.probe_epochs)
  learning_rate = learning_rate or preset.trajectory_learning_rates[trajectory]
  unit = f"{kind}-{task.name}-{trajectory}-seed{seed}"
  if metrics.has(f"{unit}/done"):
    return
  context, place, place_batch = sharding.placement(ctx.mesh)
  fields = dict(kind=kind, task=task.name, trajectory=trajectory, seed=seed)
  with context:
    step = _train_step(task.model, trajectory, learning_rate, kind, ctx.mesh)
    probe = _probe(task.model, kind, tuple(preset.landscape_steps), preset.hutchinson_samples,
                   ctx.mesh)
    tx = train_transform(trajectory, learning_rate, kind)
    names = list(tx.probes)
    state = training.initial_state(tx, task.init_params(seed), place)
    test_batch = place_batch(task.test_batch)

    def on_epoch_end(epoch, state, train_loss):
      metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/train", **fields, epoch=epoch,
                  train_loss=train_loss)
      if epoch in probe_epochs:
        next_batch = place_batch(next(task.epoch_batches(seed, epoch)))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        result = jax.device_get(probe(state.params, state.opt_state, next_batch, test_batch,
                                      key))
        metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/probe", **fields, epoch=epoch,
                    algorithms=names, step_sizes=list(preset.landscape_steps),
                    histogram_range=list(HISTOGRAM_RANGE), **result)

    training.run_epochs(step, state, lambda epoch: task.epoch_batches(seed, epoch), epochs,
                        steps_per_epoch=task.batches_per_epoch, place_batch=place_batch,
                        checkpointing=ctx.checkpointing(unit, probe_epochs),
                        on_epoch_end=on_epoch_end,
                        description=f"{task.name} {trajectory} seed {seed}")
  metrics.log(EXPERIMENT, f"{unit}/done", **fields)


def probe_records(records, *, kind="transformer"):
  return [r for r in records if r["experiment"] == EXPERIMENT and r["key"].endswith("/probe")
          and r["kind"] == kind]
