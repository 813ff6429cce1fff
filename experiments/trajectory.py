"""One training trajectory with pseudo-update probes (Appendix B.3), shared by the sharpness,
landscape, histogram, rmed and resnet experiments.

Training follows SGD-momentum or Adam, itself one of the probe optimizers
(`optclip.probes.following`): every step's gradient goes to the states of all probe
optimizers, whose updates are computed but never applied except the followed one's. At the
end of each probe epoch the point x is frozen, each probe optimizer's would-be update at x is
formed from the gradient of the next training batch, and everything is measured on the fixed
probe batch (Appendix B.3's "test batch"): the raw directional sharpness (and Eq. 4's shifted
value where it is negative), the first-order term of Eq. 1, the landscape along every
direction, λ_max, coordinate histograms, the attribution of SGD's sharpness to its top
coordinates and exact Hessian diagonal entries at a fixed sample of coordinates (R_med,
Section 4.2). One record per probe point goes to metrics.jsonl; the training state is saved
with orbax at every probe point, so ``--resume`` continues from the last one.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import optclip
from experiments import checkpoints, training
from experiments.variants import Variant
from optclip import curvature, geometry, probes

EXPERIMENT = "trajectory"
ROBUST_DELTA = 0.01  # Appendix B, Eq. (4)
ATTRIBUTION_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.5)
HISTOGRAM_BINS = 64
HISTOGRAM_RANGE = (-16.0, 0.0)
# Clip-fraction ablation: 0.1% (Appendix B.2's "very small value") up to 100%, for SGD and
# Adam (the paper's 10% and 50% among them; Section 4.1: "larger thresholds for Adam").
CLIP_ABLATION = (0.001, 0.01, 0.1, 0.5, 1.0)
# The SGD-family optimizers start their momentum at the first gradient, as the paper's code
# does (m₁ = g₁; Algorithm 3's box would start at 0); the SGD trajectory follows the SGD probe.
PROBE_MOMENTUM_START = "gradient"
SGD_FAMILY = ("sgd", "normalized sgd", "sign sgd")

# The algorithms of Tables 1 and 4-7 (transformer) and Table 9 (resnet; it clips Adam and
# Adafactor at 10%).
PAPER_PROBES = {
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
ABLATION = tuple(Variant(base, clip=f) for base in ("sgd", "adam") for f in CLIP_ABLATION
                 if Variant(base, clip=f) not in PAPER_PROBES["transformer"])
# The scale trend measures only what its figure shows (experiments.scaling).
PAPER_PROBES["scaling"] = (Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"),
                           Variant("adam", clip=0.5))
PROBES = {"transformer": PAPER_PROBES["transformer"] + ABLATION,
          "resnet": PAPER_PROBES["resnet"], "scaling": PAPER_PROBES["scaling"]}
TRAJECTORIES = ("sgd", "adam")


def probe_optimizers(kind: str = "transformer") -> dict:
  """{label: optimizer} with unit learning rates: only the direction of an update matters to
  the probes (sharpness and landscape normalise it), and a trajectory scales its own.
  Adafactor keeps its relative step size, which scales each leaf by its RMS and so is part
  of its direction."""
  def make(v):
    if v.base == "adafactor":
      return v.make(None)
    if v.base in SGD_FAMILY:
      return v.make(1.0, momentum_start=PROBE_MOMENTUM_START)
    return v.make(1.0)
  return {v.label: make(v) for v in PROBES[kind]}


def train_transform(trajectory: str, learning_rate: float, kind: str):
  """Training along the ``trajectory`` probe at ``learning_rate``, every probe following."""
  return probes.following(probe_optimizers(kind), trajectory, learning_rate)


@functools.lru_cache(maxsize=None)
def _train_step(model, kind, mesh=None):
  """The jitted training step of every trajectory, rate and seed of a task (they differ only
  in the state): one compile."""
  return training.train_step(training.model_loss(model, mesh),
                             train_transform(TRAJECTORIES[0], 1.0, kind))


@functools.lru_cache(maxsize=None)
def _probe_step(model, kind, mesh=None):
  """The directions at a probe point: every probe's update of the next step (not taken),
  and what the clipped probes' clips did in it."""
  tx = train_transform(TRAJECTORIES[0], 1.0, kind)
  return training.probe_step(training.model_loss(model, mesh), tx,
                             functools.partial(_clip_statistics, names=tuple(tx.probes)))


def _pad(stacked, count):
  """``stacked`` (k directions) padded with zero directions to ``count`` (no copy at k =
  ``count``: at GPT-Neo-125M the 20 directions take 9.3 GiB)."""
  return jax.tree.map(lambda d: d if d.shape[0] == count else jnp.concatenate(
      [d, jnp.zeros((count - d.shape[0],) + d.shape[1:], d.dtype)]), stacked)


class _Programs(NamedTuple):
  """The compiled pieces of a probe, shared by both trajectories and every seed of a task:
  XLA compiles a few small programs much faster than one large one, and every second
  derivative (directions, Eq. 4 shifts, attribution, diagonal entries) runs through one."""
  first_order: Callable
  second_derivatives: Callable
  top_eigenvalue: Callable
  attribution: Callable
  landscape: Callable
  unit_vectors: Callable
  names: list  # the probe directions' labels, in order
  width: int  # directions per second_derivatives call


@functools.lru_cache(maxsize=None)
def _programs(model, kind, steps, lanczos_iterations, mesh=None) -> _Programs:
  return make_programs(training.model_loss(model, mesh), [v.label for v in PROBES[kind]],
                       steps, lanczos_iterations)


def make_programs(loss_fn, names, steps, lanczos_iterations) -> _Programs:
  """The probe's compiled pieces for ``loss_fn(params, batch)`` and the probe ``names``."""
  # One width for every second-derivative call: the probe directions, or the attribution's
  # modified directions (three sets of fractions) if there are more of those.
  width = max(len(names), 3 * len(ATTRIBUTION_FRACTIONS))
  steps = jnp.asarray(steps, jnp.float32)

  @jax.jit
  def first_order(params, stacked, test_batch):
    """The probe-batch loss and gradient, Eq. 1's first-order term of every direction and
    the coordinate histograms of Figure 1."""
    loss, test_grads = jax.value_and_grad(loss_fn)(params, test_batch)
    correlation = jax.vmap(lambda u: optclip.gradient_correlation(test_grads, u))(stacked)
    row = lambda name: jax.tree.map(lambda d: d[names.index(name)], stacked)
    histograms = {n: geometry.coordinate_histogram(row(n), HISTOGRAM_BINS, HISTOGRAM_RANGE)
                  for n in ("sgd", "adam", "adafactor") if n in names}
    return test_grads, {
        "loss": loss, "projection": correlation.projection, "cosine": correlation.cosine,
        "inner_product": jax.vmap(lambda u: geometry.tree_dot(test_grads, u))(stacked),
        "norm": jax.vmap(geometry.tree_norm)(stacked),
        "histograms": {n: (h[0], h[2]) for n, h in histograms.items()}}

  @jax.jit
  def second_derivatives(params, stacked, shifts, test_batch):
    """uᵀ∇²f(x + s·δ·u/‖u‖)u for each of ``width`` (direction u, shift s ∈ {0, 1}): s = 1
    is Appendix B's Eq. (4). Exact (Taylor mode, as `optclip.directional_sharpness`), one
    direction at a time: on CPU that is faster than vmapping them, and it keeps one
    direction's tangents in memory."""
    test_loss = lambda p: loss_fn(p, test_batch)

    def one(args):
      u, shift = args
      scale = shift * ROBUST_DELTA / jnp.maximum(geometry.tree_norm(u), 1e-30)
      point = jax.tree.map(lambda x, d: (x + scale * d).astype(x.dtype), params, u)
      return geometry.second_derivative(test_loss, point, u, "auto")

    return jax.lax.map(one, (stacked, shifts))

  @jax.jit
  def top_eigenvalue(params, test_batch, key):
    return curvature.top_hessian_eigenvalue(lambda p: loss_fn(p, test_batch), params,
                                            iters=lanczos_iterations, key=key)

  @jax.jit
  def attribution(params, sgd_update, test_grads, test_batch):
    """SGD's sharpness and its attribution to the top coordinates by |u| and by |g|; the
    modified directions (u without its top by |u|, u clipped, u without its top by |g|;
    then zero directions up to ``width``) come back for `second_derivatives`."""
    hvp = curvature.hessian_vector_product(lambda p: loss_fn(p, test_batch), params,
                                           sgd_update)
    share, norm_share, modified = geometry.attribution_terms(sgd_update, hvp,
                                                             ATTRIBUTION_FRACTIONS)
    share_g, norm_share_g, modified_g = geometry.attribution_terms(
        sgd_update, hvp, ATTRIBUTION_FRACTIONS, select_by=test_grads)
    count = len(ATTRIBUTION_FRACTIONS)
    # Padded here to `width` with zero directions, so that no padded copy is made later.
    modified = jax.tree.map(lambda a, b: jnp.concatenate(
        [a, b[:count], jnp.zeros((width - 3 * count,) + a.shape[1:], a.dtype)]), modified,
        modified_g)
    sharpness = geometry.tree_dot(sgd_update, hvp) / geometry.tree_dot(sgd_update, sgd_update)
    return (sharpness, share, norm_share, share_g, norm_share_g,
            jax.vmap(lambda u: geometry.tree_dot(u, u))(modified), modified)

  @jax.jit
  def landscape(params, stacked, test_batch):
    return optclip.landscape(lambda p: loss_fn(p, test_batch), params, stacked, steps)

  @jax.jit
  def unit_vectors(params, leaf_ids, flat_indices):
    """Unit vectors e_i shaped like params, stacked, at (leaf, flat index) pairs."""
    rows = jnp.arange(leaf_ids.shape[0])
    return jax.tree.unflatten(jax.tree.structure(params), [
        jnp.zeros((rows.shape[0], leaf.size), leaf.dtype).at[rows, flat_indices].set(
            (leaf_ids == n).astype(leaf.dtype)).reshape((-1,) + leaf.shape)
        for n, leaf in enumerate(jax.tree.leaves(params))])

  return _Programs(first_order, second_derivatives, top_eigenvalue, attribution, landscape,
                   unit_vectors, names, width)


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


def _diagonal_entries(programs: _Programs, params, test_batch, sample) -> np.ndarray:
  """Exact H_ii at the sampled coordinates, ``width`` unit vectors per call."""
  leaf_ids = np.concatenate([np.full(len(i), n) for n, i in enumerate(sample.values())])
  flat = np.concatenate(list(sample.values()))
  width, values = programs.width, []
  for start in range(0, len(flat), width):
    count = min(width, len(flat) - start)
    ids, index = np.full(width, -1, np.int32), np.zeros(width, np.int32)
    ids[:count], index[:count] = leaf_ids[start:start + count], flat[start:start + count]
    units = programs.unit_vectors(params, jnp.asarray(ids), jnp.asarray(index))
    values.append(np.asarray(programs.second_derivatives(
        params, units, jnp.zeros(width, jnp.float32), test_batch))[:count])
  return np.concatenate(values) if values else np.zeros(0)


def probe(programs: _Programs, params, stacked, clip_statistics, test_batch, key, sample,
          with_diagonal: bool = True, lanczos: bool = True) -> dict:
  """Everything measured at one probe point x (``params``) for the probe directions
  ``stacked`` (K, ...), as host values for metrics.jsonl (``clip_statistics``: what the
  clipped probes' clips did in that step). ``stacked`` is consumed: its buffers are freed
  once read. The exact Hessian diagonal entries
  at the sampled coordinates (the costliest part) only ``with_diagonal``, λ_max only with
  ``lanczos``."""
  names, width = programs.names, programs.width
  count = len(names)
  test_grads, measured = programs.first_order(params, stacked, test_batch)
  measured = jax.device_get(measured)
  norm_sq = np.asarray(measured["norm"], np.float64) ** 2

  def second(directions, shifts=()):
    """Second derivatives along ``directions`` padded to ``width`` (shifted where told)."""
    padded = np.zeros(width, np.float32)
    padded[:len(shifts)] = shifts
    values = programs.second_derivatives(params, _pad(directions, width), jnp.asarray(padded),
                                         test_batch)
    return np.asarray(values, np.float64)

  with np.errstate(divide="ignore", invalid="ignore"):  # a zero direction: undefined
    raw = second(stacked)[:count] / norm_sq
  shifted = raw < 0
  robust = raw.copy()
  if shifted.any():  # Appendix B, Eq. (4): re-evaluated at x + δu/‖u‖
    robust[shifted] = (second(stacked, shifted)[:count] / norm_sq)[shifted]
  landscape = np.asarray(programs.landscape(params, stacked, test_batch))
  sgd_update = jax.tree.map(lambda d: d[names.index("sgd")], stacked)
  # At the paper's sizes the directions take GiBs (9.3 at GPT-Neo-125M): the modified ones
  # below take their place rather than join them.
  for leaf in jax.tree.leaves(stacked):
    leaf.delete()
  (sgd_sharpness, share, norm_share, share_g, norm_share_g, modified_norm_sq,
   modified) = programs.attribution(params, sgd_update, test_grads, test_batch)
  fractions = len(ATTRIBUTION_FRACTIONS)
  with np.errstate(divide="ignore", invalid="ignore"):  # nothing left after removal: undefined
    attributed = (second(modified)[:3 * fractions]
                  / np.asarray(modified_norm_sq, np.float64)[:3 * fractions])
  del modified
  if not with_diagonal:
    sample = {name: index[:0] for name, index in sample.items()}
  diagonal = _diagonal_entries(programs, params, test_batch, sample)
  bounds = np.cumsum([0] + [len(i) for i in sample.values()])

  def per_leaf(values):
    return {name: np.asarray(values[a:b]).tolist()
            for name, a, b in zip(sample, bounds[:-1], bounds[1:])}

  def at_sample(tree):
    return np.concatenate([np.asarray(leaf).reshape(-1)[i]
                           for leaf, i in zip(jax.tree.leaves(tree), sample.values())])

  return {**measured, "sharpness": raw, "sharpness_robust": robust, "shifted": shifted,
          "landscape": landscape,
          "lambda_max": (float(programs.top_eigenvalue(params, test_batch, key))
                         if lanczos else float("nan")),
          "clip": jax.device_get(clip_statistics),
          "attribution": {
              "fractions": list(ATTRIBUTION_FRACTIONS), "sharpness": float(sgd_sharpness),
              "share": share, "norm_share": norm_share, "share_by_gradient": share_g,
              "norm_share_by_gradient": norm_share_g,
              "sharpness_without": attributed[:fractions],
              "sharpness_clipped": attributed[fractions:2 * fractions],
              "sharpness_without_by_gradient": attributed[2 * fractions:]},
          "curvature_sample": {
              "leaf_shapes": {n: list(np.shape(l)) for n, l in zip(sample, jax.tree.leaves(params))},
              "hessian_diagonal": per_leaf(diagonal),
              "gradient": per_leaf(at_sample(jax.device_get(test_grads))),
              "sgd_update": per_leaf(at_sample(jax.device_get(sgd_update)))}}


def _fills_memory(*trees) -> bool:
  """Whether ``trees`` take more than half of what a device holds (an accelerator's
  allocator limit; the host's RAM on CPU, where all devices share it), leaving too little
  for the probe programs."""
  device = jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  held = sum(shard.data.nbytes for leaf in jax.tree.leaves(trees)
             for shard in leaf.addressable_shards)
  if limit is None:
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  else:
    held /= len(jax.local_devices())
  return held > limit / 2


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
  learning_rate = learning_rate or preset.trajectory_learning_rates[trajectory]
  unit = "-".join([kind, task.name] + ([model_name] if model_name else [])
                  + [trajectory, f"seed{seed}"])
  if metrics.has(f"{unit}/done"):
    return
  context, place, place_batch = sharding.placement(ctx.mesh)
  fields = dict(kind=kind, task=task.name, trajectory=trajectory, seed=seed,
                **({"model": model_name} if model_name else {}))
  with context:
    step = _train_step(task.model, kind, ctx.mesh)
    directions = _probe_step(task.model, kind, ctx.mesh)
    programs = _programs(task.model, kind, tuple(preset.landscape_steps),
                         preset.lanczos_iterations, ctx.mesh)
    tx = train_transform(trajectory, learning_rate, kind)
    names = list(tx.probes)
    params = task.init_params(seed)
    sample = curvature_sample(params, preset.curvature_samples, seed)
    state = training.initial_state(tx, params, place)
    test_batch = place_batch(task.test_batch)
    if not metrics.has(f"{unit}/epoch0/start"):
      start_loss = training.model_loss(task.model, ctx.mesh)(state.params, test_batch)
      metrics.log(EXPERIMENT, f"{unit}/epoch0/start", **fields, epoch=0,
                  probe_loss=float(start_loss), learning_rate=learning_rate)

    def on_epoch_end(epoch, state, train_loss):
      metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/train", **fields, epoch=epoch,
                  train_loss=train_loss)
      if epoch in probe_epochs:
        # The directions: the step on the next training batch from x, not taken (the
        # trajectory itself goes on unchanged).
        next_batch = place_batch(next(task.epoch_batches(seed, epoch)))
        stacked, clip_statistics = directions(state, next_batch)
        # The probe reads only the parameters: where the optimizer states would crowd the
        # probe programs out of memory (GPT-Neo-125M's 20 probe states on a 24 GiB host),
        # they wait on disk meanwhile; they come back bit for bit.
        bring_back = (checkpoints.set_aside(ctx.out, unit, state.opt_state)
                      if _fills_memory(state, stacked) else None)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        result = probe(programs, state.params, stacked, clip_statistics, test_batch, key,
                       sample, preset.curvature_at == "every" or epoch == probe_epochs[-1],
                       lanczos=preset.lanczos_iterations > 0)
        metrics.log(EXPERIMENT, f"{unit}/epoch{epoch}/probe", **fields, epoch=epoch,
                    algorithms=names, step_sizes=list(preset.landscape_steps),
                    histogram_range=list(HISTOGRAM_RANGE), **result)
        if bring_back is not None:
          return training.TrainState(state.params, bring_back())
      return None

    training.run_epochs(step, state, lambda epoch: task.epoch_batches(seed, epoch), epochs,
                        steps_per_epoch=task.batches_per_epoch, place_batch=place_batch,
                        checkpointing=ctx.checkpointing(unit, probe_epochs),
                        on_epoch_end=on_epoch_end,
                        description=f"{task.name} {trajectory} seed {seed}")
  metrics.log(EXPERIMENT, f"{unit}/done", **fields)
  checkpoints.discard(ctx.out, unit)


def checkpoint_bytes(task, kind: str = "transformer") -> int:
  """Bytes of one saved step of a unit of ``task``: parameters and every probe optimizer's
  state, as `jax.eval_shape` gives them (nothing is allocated)."""
  state = jax.eval_shape(lambda: training.initial_state(
      train_transform(TRAJECTORIES[0], 1.0, kind), task.init_params(0)))
  return training.tree_bytes(state)


def probe_records(records, *, kind="transformer"):
  return [r for r in records if r["experiment"] == EXPERIMENT and r["key"].endswith("/probe")
          and r["kind"] == kind]
