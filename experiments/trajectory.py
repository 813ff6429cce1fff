"""One training trajectory with pseudo-update probes (Appendix B), shared by the sharpness,
landscape, histogram, rmed and resnet experiments.

Training follows SGD-momentum or Adam. Every step's gradient also goes into the states of all
probe optimizers (pseudo-updates, never applied). At the end of each probe epoch the point x
is frozen, each probe optimizer's would-be update at x is formed from the gradient of the next
training batch, and everything is measured on the fixed test batch: the (robust) directional
sharpness, the landscape along every direction, the gradient correlation, coordinate
histograms, the sharpness attribution to SGD's top coordinates and R_med of the Hessian
diagonal. One record per probe point goes to metrics.jsonl; the training state is saved with
orbax so that ``--resume`` continues from the last probe point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from experiments import common
from optclip.data.batching import prefetch

EXPERIMENT = "trajectory"
ROBUST_DELTA = 0.01  # Appendix B, Eq. (4)
ATTRIBUTION_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.5)
HISTOGRAM_BINS = 64
HISTOGRAM_RANGE = (-16.0, 0.0)


def probe_optimizers(kind: str = "transformer") -> dict:
  """The algorithms of Tables 1 and 4-7 (transformer) or Table 9 (resnet), with unit learning
  rates: only the direction of an update matters to the probes (sharpness and landscape
  normalise it)."""
  if kind == "resnet":  # Table 9 clips Adam and Adafactor at 10%
    return {
        "sgd": optclip.sgd(1.0), "sgd, clip grad 0.1": optclip.sgd(1.0, clip=0.1),
        "adam": optclip.adam(1.0), "adam, clip grad 0.1": optclip.adam(1.0, clip=0.1),
        "adafactor": optclip.adafactor(), "adafactor, clip grad 0.1": optclip.adafactor(clip=0.1),
        "lion": optclip.lion(1.0), "sign sgd": optclip.sign_sgd(1.0),
        "normalized sgd": optclip.normalized_sgd(1.0),
        "normalized sgd, clip grad 0.1": optclip.normalized_sgd(1.0, clip=0.1),
    }
  return {
      "sgd": optclip.sgd(1.0), "sgd, clip grad 0.1": optclip.sgd(1.0, clip=0.1),
      "adam": optclip.adam(1.0), "adam, clip grad 0.5": optclip.adam(1.0, clip=0.5),
      "adam, clip update 0.5": optclip.adam(1.0, clip_update=0.5),
      "adafactor": optclip.adafactor(), "adafactor, clip grad 0.5": optclip.adafactor(clip=0.5),
      "lion": optclip.lion(1.0), "lion, clip update 0.5": optclip.lion(1.0, clip_update=0.5),
      "sign sgd": optclip.sign_sgd(1.0), "normalized sgd": optclip.normalized_sgd(1.0),
      "normalized sgd, clip grad 0.1": optclip.normalized_sgd(1.0, clip=0.1),
  }


def trajectory_optimizer(name: str, learning_rate: float):
  if name == "sgd":
    return optclip.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optclip.adam(learning_rate)
  raise ValueError(f"trajectory must be 'sgd' or 'adam', got {name!r}")


@functools.lru_cache(maxsize=None)
def _train_step(model, trajectory, learning_rate, kind, mesh=None):
  """The jitted training step, shared by every seed of a task (same shapes, one compile)."""
  loss_fn = common.model_loss(model, mesh)
  train_tx = trajectory_optimizer(trajectory, learning_rate)
  probes = probe_optimizers(kind)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch):
    params, train_state, probe_states = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, train_state = train_tx.update(grads, train_state, params)
    _, probe_states = optclip.step_pseudo_updates(probes, probe_states, grads, params)
    return (optax.apply_updates(params, updates), train_state, probe_states), loss

  return train_step


@functools.lru_cache(maxsize=None)
def _probe(model, kind, steps, hutchinson_samples, mesh=None):
  """The probe, shared by both trajectories and every seed of a task.

  Jitted in separate pieces: XLA compiles several small programs faster than one large one.
  """
  loss_fn = common.model_loss(model, mesh)
  probes = probe_optimizers(kind)
  names = list(probes)
  steps = jnp.asarray(steps, jnp.float32)

  @jax.jit
  def would_be_updates(params, probe_states, next_batch):
    grads = jax.grad(loss_fn)(params, next_batch)
    updates, _ = optclip.step_pseudo_updates(probes, probe_states, grads, params)
    return updates

  @jax.jit
  def geometry(params, updates, test_batch):
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
    histograms = {n: optclip.coordinate_histogram(updates[n], HISTOGRAM_BINS, HISTOGRAM_RANGE)
                  for n in ("sgd", "adam", "adafactor")}
    return {"histograms": {n: (h[0], h[2]) for n, h in histograms.items()},
            "attribution": optclip.sharpness_attribution(test_loss, params, updates["sgd"],
                                                         ATTRIBUTION_FRACTIONS)}

  @jax.jit
  def curvature(params, test_batch, key):
    test_loss = lambda p: loss_fn(p, test_batch)
    diagonal = optclip.hessian_diagonal(test_loss, params, method="hutchinson", key=key,
                                        samples=hutchinson_samples)
    return {"r_med": optclip.r_med(diagonal)}

  def probe(params, probe_states, next_batch, test_batch, key):
    updates = would_be_updates(params, probe_states, next_batch)
    return {**geometry(params, updates, test_batch), **coordinates(params, updates, test_batch),
            **curvature(params, test_batch, key)}

  return probe


def run(task, trajectory: str, seed: int, preset, out: str, metrics: common.Metrics, *,
        kind: str = "transformer", epochs: int | None = None, probe_epochs=None,
        learning_rate: float | None = None, mesh=None) -> None:
  """Trains one (task, trajectory, seed) unit and logs a record per probe epoch.

  With a ``mesh``, parameters and optimizer states are FSDP-sharded over its ``fsdp`` axis
  and batches split over ``data``; checkpoints restore onto whatever mesh is given.
  """
  from optclip import sharding
  context, place, place_batch = sharding.placement(mesh)
  with context:
    _run(task, trajectory, seed, preset, out, metrics, kind, epochs, probe_epochs,
         learning_rate, mesh, place, place_batch)


def _run(task, trajectory, seed, preset, out, metrics, kind, epochs, probe_epochs,
         learning_rate, mesh, place, place_batch):
  epochs = epochs or preset.epochs
  probe_epochs = tuple(probe_epochs or preset.probe_epochs)
  learning_rate = learning_rate or preset.trajectory_learning_rates[trajectory]
  unit = f"{kind}-{task.name}-{trajectory}-seed{seed}"
  if metrics.has(f"{unit}/done"):
    return
  train_step = _train_step(task.model, trajectory, learning_rate, kind, mesh)
  probe = _probe(task.model, kind, tuple(preset.landscape_steps), preset.hutchinson_samples,
                 mesh)
  names = tuple(probe_optimizers(kind))
  params = task.init_params(seed)
  probes = probe_optimizers(kind)
  state = common.owned_copy(place((
      params, trajectory_optimizer(trajectory, learning_rate).init(params),
      optclip.init_pseudo_updates(probes, params))))
  start = 0
  saved = common.latest_checkpoint(out, unit)
  if saved is not None:
    state = common.restore_checkpoint(out, unit, saved, state)
    start = saved
  bar = common.progress(total=(epochs - start) * task.batches_per_epoch,
                        desc=f"{task.name} {trajectory} seed {seed}")
  for epoch in range(start, epochs):
    losses = []
    for batch in prefetch(map(place_batch, task.epoch_batches(seed, epoch))):
      state, loss = train_step(state, batch)
      losses.append(loss)
      bar.update()
    train_loss = float(np.mean(jax.device_get(losses)))
    bar.set_postfix(loss=f"{train_loss:.4f}")
    metrics.log(EXPERIMENT, f"{unit}/epoch{epoch + 1}/train", kind=kind, task=task.name,
                trajectory=trajectory, seed=seed, epoch=epoch + 1, train_loss=train_loss)
    if epoch + 1 in probe_epochs:
      next_batch = place_batch(next(task.epoch_batches(seed, epoch + 1)))
      key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch + 1)
      result = jax.device_get(probe(state[0], state[2], next_batch, place_batch(task.test_batch), key))
      metrics.log(EXPERIMENT, f"{unit}/epoch{epoch + 1}/probe", kind=kind, task=task.name,
                  trajectory=trajectory, seed=seed, epoch=epoch + 1, algorithms=list(names),
                  step_sizes=list(preset.landscape_steps),
                  histogram_range=list(HISTOGRAM_RANGE), **result)
      common.save_checkpoint(out, unit, epoch + 1, state)
  bar.close()
  metrics.log(EXPERIMENT, f"{unit}/done", kind=kind, task=task.name, trajectory=trajectory,
              seed=seed)


def probe_records(records, *, kind="transformer"):
  return [r for r in records if r["experiment"] == EXPERIMENT and r["key"].endswith("/probe")
          and r["kind"] == kind]
