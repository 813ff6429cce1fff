"""What a probe point measures: a list of named measurements, run in order.

At a probe point x every probe optimizer's would-be update u is known (the stacked
``directions``) and everything is measured on the fixed probe batch. Each `Measurement`
declares what it reads (the point's inputs, or what an earlier measurement produced), what
it produces for later ones, the record fields it writes, the compiled programs it runs,
its cost in primitive evaluations (the planner sums these) and the preset setting that
switches it off. `measure` runs the list and frees every value once the last measurement
that reads it has run, so the memory order follows from the declarations, not from line
order: at the paper's sizes the 20 directions take GiBs (9.3 at GPT-Neo-125M) and are gone
before the Lanczos and SLQ programs run. Every second derivative's direction (a probe update,
its block parts, the attribution's modified ones, the diagonal's unit vectors) is formed from
a recipe inside the one program that differentiates along it (`Rows`), so none of them is
ever stacked beside the probe updates.

Adding a measurement is one entry in `MEASUREMENTS` (and its section in
`experiments.sections`); the entry documents its record fields, which
`experiments.artifacts.records` gathers with every other record's.

The point's inputs: ``params`` (x), ``directions`` (K stacked updates, consumed), ``names``
(their labels), ``probe_batch``, ``key`` (for Lanczos), ``sample`` (the fixed coordinates of
the Hessian diagonal) and ``diagonal_here`` (whether to take them at this point),
``first_point`` (whether this is the unit's first probe point), ``adam_preconditioner``
(√v̂ + ε of the Adam probe's state, or None) and ``clip_statistics`` (what the clipped
probes' clips did in that step).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import optclip
from experiments import host_memory
from optclip import blocks as block_partition
from optclip import curvature, geometry, spectrum
from optclip.microbatch import as_objective
from optclip.sharding import placed_like

ROBUST_DELTA = 0.01  # Appendix B, Eq. (4)
ATTRIBUTION_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.5)
HISTOGRAM_BINS = 64
HISTOGRAM_RANGE = (-16.0, 0.0)
# Inputs that belong to the caller (never freed here); everything else a measurement reads
# is the point's own and is freed after its last reader.
CALLER_OWNED = ("params", "probe_batch", "names", "key", "sample", "diagonal_here",
                "first_point")


class Cost(NamedTuple):
  """How many primitive evaluations on the probe batch a measurement makes at one point."""
  forwards: float = 0.0  # loss values
  gradients: float = 0.0  # value and gradient
  second_derivatives: float = 0.0  # uᵀ∇²f u along one direction (Taylor or forward mode)
  hessian_vector_products: float = 0.0


class Shape(NamedTuple):
  """What a point's cost depends on."""
  directions: int  # K
  width: int  # directions per second-derivative call
  steps: int  # landscape step sizes
  lanczos_iterations: int
  diagonal_calls: float  # calls of ``width`` exact H_ii at this point
  blocks: int  # parameter blocks of the block split
  block_directions: int = 0  # directions the block split is taken for
  block_spectrum_matvecs: float = 0.0  # blocks × samples × steps, times the share of points


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One named measurement of a probe point (see the module docstring)."""
  name: str
  reads: tuple
  run: Callable  # (Point) -> {field or produced name: value}
  fields: dict = dataclasses.field(default_factory=dict)  # record field -> what it holds
  produces: tuple = ()  # values for later measurements
  programs: tuple = ()  # names of the compiled programs it runs (see `make_programs`)
  cost: Callable = lambda shape: Cost()  # (Shape) -> Cost
  off: Callable = lambda preset: None  # (preset) -> why it is switched off, or None


class Programs(NamedTuple):
  """The compiled pieces of a probe, shared by both trajectories and every seed of a task:
  XLA compiles a few small programs much faster than one large one, and every second
  derivative (directions, Eq. 4 shifts, attribution, diagonal entries, block splits) runs
  through one."""
  first_order: Callable
  second_derivatives: Callable
  top_eigenvalue: Callable
  attribution: Callable
  landscape: Callable
  preconditioned_top_eigenvalue: Callable
  block_spectra: Callable
  names: list  # the probe directions' labels, in order
  width: int  # directions per second_derivatives call


# How `second_derivatives` forms a row's direction from its source (a probe update u, with
# the threshold τ of its row): as it is, without the coordinates |u_i| ≥ τ, clipped to
# [-τ, τ], without the coordinates where the probe-batch gradient has |g_i| ≥ τ, or the unit
# vector e_i of one coordinate (the Hessian diagonal; no source).
AS_IS, WITHOUT_TOP, CLIPPED, WITHOUT_TOP_BY_GRADIENT, UNIT = range(5)


class Rows(NamedTuple):
  """The ``width`` directions of one `second_derivatives` call, as recipes: each is formed
  inside the call from the K probe updates, so no stacked copy of the modified directions
  (attribution), block parts or unit vectors is ever made (at t5-small, 20 of any of them
  take 4.5 GiB)."""
  source: jax.Array  # (W,) int32: the probe update a row starts from
  keep: jax.Array  # (W, leaves) bool: the leaves it keeps (the block split); none: zero
  op: jax.Array  # (W,) int32: AS_IS, WITHOUT_TOP, CLIPPED, WITHOUT_TOP_BY_GRADIENT or UNIT
  tau: jax.Array  # (W,) float32: the threshold of WITHOUT_TOP, CLIPPED and ..._BY_GRADIENT
  unit_leaf: jax.Array  # (W,) int32: UNIT's leaf
  unit_index: jax.Array  # (W,) int32: UNIT's flat index in that leaf
  shift: jax.Array  # (W,) float32: 1 evaluates at x + δu/‖u‖ (Appendix B, Eq. 4), 0 at x


def make_rows(width: int, leaves: int, count: int = 0, **given) -> Rows:
  """``width`` rows, the first ``count`` as ``given`` (arrays or scalars per field), the
  rest zero directions (nothing kept): every call has the same shapes, so one compiled
  program serves them all."""
  defaults = dict(source=(np.int32, 0), keep=(bool, True), op=(np.int32, AS_IS),
                  tau=(np.float32, 0.0), unit_leaf=(np.int32, 0), unit_index=(np.int32, 0),
                  shift=(np.float32, 0.0))
  fields = {}
  for name, (dtype, default) in defaults.items():
    shape = (width, leaves) if name == "keep" else (width,)
    value = np.zeros(shape, dtype)
    value[:count] = np.asarray(given.get(name, default), dtype)
    fields[name] = jnp.asarray(value)
  return Rows(**fields)


def _direction(stacked, gradient, row: Rows):
  """One row's direction (see `Rows`), leaf by leaf: elementwise, so it fuses into one pass
  over the parameters."""
  directions = jax.tree.leaves(stacked)
  out = []
  for n, (d, g) in enumerate(zip(directions, jax.tree.leaves(gradient))):
    u = d[row.source]
    u = jnp.where((row.op == WITHOUT_TOP) & (jnp.abs(u) >= row.tau), 0, u)
    u = jnp.where(row.op == CLIPPED, jnp.clip(u, -row.tau, row.tau), u)
    u = jnp.where((row.op == WITHOUT_TOP_BY_GRADIENT) & (jnp.abs(g) >= row.tau), 0, u)
    # A unit vector: the iota is placed like u, so that the mesh sees operands placed alike.
    index = placed_like(jax.lax.broadcasted_iota(jnp.int32, u.shape, 0), u)
    for axis in range(1, u.ndim):
      index = index * u.shape[axis] + placed_like(
          jax.lax.broadcasted_iota(jnp.int32, u.shape, axis), u)
    unit = ((row.unit_leaf == n) & (index == row.unit_index)).astype(u.dtype)
    u = jnp.where(row.op == UNIT, unit, jnp.where(row.keep[n], u, 0))
    out.append(u.astype(d.dtype))
  return jax.tree.unflatten(jax.tree.structure(gradient), out)


def make_programs(loss_fn, names, steps, lanczos_iterations, *, landscape_batch: int = 1,
                  reverse=None, block_spectrum_steps: int = 16,
                  block_spectrum_samples: int = 2) -> Programs:
  """The probe's compiled pieces for the loss (``loss_fn(params, batch)``, or an
  `optclip.microbatch.Objective`: every program then sums over micro-batches) and the probe
  ``names``; ``reverse`` (default: the same) is the objective of the reverse-mode programs
  (gradient, Hessian-vector products), which may rematerialise per block.

  Directions are evaluated one at a time and ``landscape_batch`` (direction, step) pairs
  per forward: explicit, so that a CPU plan compiles what an accelerator runs.
  """
  forward = as_objective(loss_fn)
  reverse = forward if reverse is None else as_objective(reverse)
  # One width for every second-derivative call: the probe directions, or the attribution's
  # modified directions (three sets of fractions) if there are more of those.
  width = max(len(names), 3 * len(ATTRIBUTION_FRACTIONS))
  steps = jnp.asarray(steps, jnp.float32)

  @jax.jit
  def first_order(params, stacked, test_batch):
    """The probe-batch loss and gradient, Eq. 1's first-order term of every direction and
    the coordinate histograms of Figure 1."""
    loss, test_grads = reverse.value_and_grad(params, test_batch)

    # One direction at a time (`jax.lax.map`, not vmap): XLA on CPU materialises the
    # operand of every large reduction, so K directions side by side would hold K
    # parameter-sized temporaries (4.5 GiB at t5-small).
    def terms(u):
      correlation = optclip.gradient_correlation(test_grads, u)
      return (correlation.projection, correlation.cosine, geometry.tree_dot(test_grads, u),
              geometry.tree_norm(u))

    projection, cosine, inner_product, norm = jax.lax.map(terms, stacked)
    shown = [n for n in ("sgd", "adam", "adafactor") if n in names]
    counts, _, zeros = jax.lax.map(
        lambda k: geometry.coordinate_histogram(jax.tree.map(lambda d: d[k], stacked),
                                                HISTOGRAM_BINS, HISTOGRAM_RANGE),
        jnp.asarray([names.index(n) for n in shown], jnp.int32))
    return test_grads, {
        "loss": loss, "projection": projection, "cosine": cosine,
        "inner_product": inner_product, "norm": norm,
        "histograms": {n: (counts[i], zeros[i]) for i, n in enumerate(shown)}}

  @jax.jit
  def second_derivatives(params, stacked, gradient, recipes: Rows, test_batch):
    """(uᵀ∇²f(x + s·δ·u/‖u‖)u, ‖u‖²) for each of ``width`` directions u formed from the
    stacked probe updates and the probe-batch gradient by ``recipes`` (`Rows`; s = 1 is
    Appendix B's Eq. 4). Exact (Taylor mode, as `optclip.directional_sharpness`), one
    direction at a time: on CPU that is faster than vmapping them, and it keeps one
    direction and its tangents in memory."""
    def one(row):
      u = _direction(stacked, gradient, row)
      norm_sq = geometry.tree_dot(u, u)
      scale = row.shift * ROBUST_DELTA / jnp.maximum(jnp.sqrt(norm_sq), 1e-30)
      point = jax.tree.map(lambda x, d: (x + scale * d).astype(x.dtype), params, u)
      return forward.apply(lambda f: geometry.second_derivative(f, point, u, "auto"),
                           test_batch), norm_sq

    return jax.lax.map(one, recipes)

  def hvp(params, vector, test_batch):
    return reverse.apply(lambda f: curvature.hessian_vector_product(f, params, vector),
                         test_batch)

  @jax.jit
  def top_eigenvalue(params, test_batch, key):
    return spectrum.top_eigenvalue(lambda v: hvp(params, v, test_batch), params,
                                   iters=lanczos_iterations, key=key)

  @jax.jit
  def preconditioned_top_eigenvalue(params, preconditioner, test_batch, key):
    """λ_max(P⁻¹H) (`optclip.curvature.preconditioned_top_eigenvalue` on this probe's
    micro-batched HVP)."""
    matvec = spectrum.preconditioned(lambda v: hvp(params, v, test_batch), preconditioner)
    return spectrum.top_eigenvalue(matvec, params, iters=lanczos_iterations, key=key)

  @jax.jit
  def block_spectra(params, test_batch, key):
    """The SLQ density of each block's (by kind) diagonal Hessian block."""
    return spectrum.block_spectral_densities(
        lambda v: hvp(params, v, test_batch), params,
        block_partition.partition(params, by="kind"), key=key,
        num_matvecs=block_spectrum_steps, num_samples=block_spectrum_samples)

  @jax.jit
  def attribution(params, sgd_update, test_grads, test_batch):
    """SGD's sharpness, its attribution to the top coordinates by |u| and by |g|, and the
    thresholds (u's and g's own, per fraction) whose modified directions
    `second_derivatives` forms (`WITHOUT_TOP`, `CLIPPED`, `WITHOUT_TOP_BY_GRADIENT`)."""
    product = hvp(params, sgd_update, test_batch)
    taus = [optclip.clip_threshold(sgd_update, f) for f in ATTRIBUTION_FRACTIONS]
    taus_g = [optclip.clip_threshold(test_grads, f) for f in ATTRIBUTION_FRACTIONS]
    # The modified directions these return are never used here: XLA drops them.
    share, norm_share, _ = geometry.attribution_terms(
        sgd_update, product, ATTRIBUTION_FRACTIONS, thresholds=taus)
    share_g, norm_share_g, _ = geometry.attribution_terms(
        sgd_update, product, ATTRIBUTION_FRACTIONS, select_by=test_grads, thresholds=taus,
        select_thresholds=taus_g)
    sharpness = (geometry.tree_dot(sgd_update, product)
                 / geometry.tree_dot(sgd_update, sgd_update))
    return (sharpness, share, norm_share, share_g, norm_share_g, jnp.stack(taus),
            jnp.stack(taus_g))

  @jax.jit
  def landscape(params, stacked, test_batch):
    return forward.apply(lambda f: optclip.landscape(f, params, stacked, steps,
                                                     batch_size=landscape_batch), test_batch)

  return Programs(first_order, second_derivatives, top_eigenvalue, attribution, landscape,
                  preconditioned_top_eigenvalue, block_spectra, list(names), width)


class Point(NamedTuple):
  """What a measurement's ``run`` receives: the programs, the values it may read, the
  preset."""
  programs: Programs
  values: dict
  preset: object

  def __getitem__(self, name):
    return self.values[name]

  def second(self, count: int = 0, **given) -> tuple:
    """(second derivatives, squared norms) of the ``count`` directions that ``given``
    describes (fields of `Rows`), formed from the point's probe updates; float64, of length
    ``count``."""
    programs = self.programs
    leaves = len(jax.tree.leaves(self["params"]))
    values, norm_sq = programs.second_derivatives(
        self["params"], self["directions"], self["test_grads"],
        make_rows(programs.width, leaves, count, **given), self["probe_batch"])
    return (np.asarray(values, np.float64)[:count], np.asarray(norm_sq, np.float64)[:count])


# --- the measurements, in the order they run -----------------------------------------------

def _first_order(point: Point) -> dict:
  test_grads, measured = point.programs.first_order(point["params"], point["directions"],
                                                    point["probe_batch"])
  measured = jax.device_get(measured)
  return {**measured, "test_grads": test_grads,
          "norm_sq": np.asarray(measured["norm"], np.float64) ** 2}


def _sharpness(point: Point) -> dict:
  count, norm_sq = len(point["names"]), point["norm_sq"]
  with np.errstate(divide="ignore", invalid="ignore"):  # a zero direction: undefined
    raw = point.second(count, source=np.arange(count))[0] / norm_sq
  shifted = raw < 0
  robust = raw.copy()
  if shifted.any():  # Appendix B, Eq. (4): re-evaluated at x + δu/‖u‖
    again = point.second(count, source=np.arange(count), shift=shifted)[0] / norm_sq
    robust[shifted] = again[shifted]
  return {"sharpness": raw, "sharpness_robust": robust, "shifted": shifted}


def _landscape(point: Point) -> dict:
  return {"landscape": np.asarray(point.programs.landscape(
      point["params"], point["directions"], point["probe_batch"]))}


def block_labels(params) -> list:
  """The block of every leaf of ``params`` (by kind: embedding, query/key, value/output, MLP,
  norm, head), in leaf order, and the blocks in order of first appearance."""
  labels = jax.tree.leaves(block_partition.partition(params, by="kind"))
  return labels, list(dict.fromkeys(labels))


def block_directions(names, preset) -> list:
  """The labels among ``names`` whose sharpness is split over blocks: the preset's
  ``block_sharpness_directions``, or every probe update where it names none."""
  wanted = preset.block_sharpness_directions
  return [n for n in names if not wanted or n in wanted]


def _block_sharpness(point: Point) -> dict:
  """u_bᵀ∇²f u_b / ‖u‖² for every probe update of `block_directions` and every block b (u_b:
  u on b's leaves only), and the cross terms' share 1 − Σ_b u_bᵀ∇²f u_b / uᵀ∇²f u."""
  programs, names = point.programs, point["names"]
  labels, blocks = block_labels(point["params"])
  chosen = [names.index(n) for n in block_directions(names, point.preset)]
  pairs = [(k, b) for k in chosen for b in range(len(blocks))]
  values = np.zeros((len(names), len(blocks)))
  for start in range(0, len(pairs), programs.width):
    chunk = pairs[start:start + programs.width]
    keep = [[label == blocks[b] for label in labels] for _, b in chunk]
    second, _ = point.second(len(chunk), source=[k for k, _ in chunk], keep=keep)
    for (k, b), value in zip(chunk, second):
      values[k, b] = value
  with np.errstate(divide="ignore", invalid="ignore"):  # a zero direction: undefined
    diagonal = (values / point["norm_sq"][:, None])[chosen]
    cross = 1.0 - diagonal.sum(axis=1) / point["sharpness"][chosen]
  return {"block_sharpness": {"directions": [names[k] for k in chosen], "blocks": blocks,
                              "diagonal": diagonal, "cross_share": cross}}


def _sgd_direction(point: Point) -> dict:
  names = point["names"]
  return {"sgd_update": jax.tree.map(lambda d: d[names.index("sgd")], point["directions"])}


def _attribution(point: Point) -> dict:
  (sgd_sharpness, share, norm_share, share_g, norm_share_g, taus,
   taus_g) = point.programs.attribution(point["params"], point["sgd_update"],
                                        point["test_grads"], point["probe_batch"])
  count = len(ATTRIBUTION_FRACTIONS)
  taus, taus_g = np.asarray(taus), np.asarray(taus_g)
  # u without its top by |u|, u clipped, u without its top by |g|: one row each per fraction.
  second, modified_norm_sq = point.second(
      3 * count, source=point["names"].index("sgd"),
      op=[WITHOUT_TOP] * count + [CLIPPED] * count + [WITHOUT_TOP_BY_GRADIENT] * count,
      tau=np.concatenate([taus, taus, taus_g]))
  with np.errstate(divide="ignore", invalid="ignore"):  # nothing left after removal: undefined
    attributed = second / modified_norm_sq
  return {"attribution": {
      "fractions": list(ATTRIBUTION_FRACTIONS), "sharpness": float(sgd_sharpness),
      "share": share, "norm_share": norm_share, "share_by_gradient": share_g,
      "norm_share_by_gradient": norm_share_g,
      "sharpness_without": attributed[:count],
      "sharpness_clipped": attributed[count:2 * count],
      "sharpness_without_by_gradient": attributed[2 * count:]}}


def _diagonal_entries(point: Point, sample) -> np.ndarray:
  """Exact H_ii at the sampled coordinates, ``width`` unit vectors per call."""
  leaf_ids = np.concatenate([np.full(len(i), n) for n, i in enumerate(sample.values())])
  flat = np.concatenate(list(sample.values()))
  width, values = point.programs.width, []
  for start in range(0, len(flat), width):
    count = min(width, len(flat) - start)
    values.append(point.second(count, op=UNIT, unit_leaf=leaf_ids[start:start + count],
                               unit_index=flat[start:start + count])[0])
  return np.concatenate(values) if values else np.zeros(0)


def _hessian_diagonal(point: Point) -> dict:
  """Exact H_ii at the fixed sample of coordinates (where the preset takes them at this
  point; otherwise the sample's layout with no entries), with the probe-batch gradient and
  SGD's update at the same coordinates (R_med, Section 4.2)."""
  sample, params = point["sample"], point["params"]
  if not point["diagonal_here"]:
    sample = {name: index[:0] for name, index in sample.items()}
  diagonal = _diagonal_entries(point, sample)
  bounds = np.cumsum([0] + [len(i) for i in sample.values()])

  def per_leaf(values):
    return {name: np.asarray(values[a:b]).tolist()
            for name, a, b in zip(sample, bounds[:-1], bounds[1:])}

  def at_sample(tree):
    return np.concatenate([np.asarray(leaf).reshape(-1)[i]
                           for leaf, i in zip(jax.tree.leaves(tree), sample.values())])

  return {"curvature_sample": {
      "leaf_shapes": {n: list(np.shape(l)) for n, l in zip(sample, jax.tree.leaves(params))},
      "hessian_diagonal": per_leaf(diagonal),
      "gradient": per_leaf(at_sample(jax.device_get(point["test_grads"]))),
      "sgd_update": per_leaf(at_sample(jax.device_get(point["sgd_update"])))}}


def _lambda_max(point: Point) -> dict:
  return {"lambda_max": float(point.programs.top_eigenvalue(point["params"],
                                                            point["probe_batch"],
                                                            point["key"]))}


def _preconditioned_sharpness(point: Point) -> dict:
  preconditioner = point["adam_preconditioner"]
  if preconditioner is None:
    return {"preconditioned_sharpness": None}
  return {"preconditioned_sharpness": float(point.programs.preconditioned_top_eigenvalue(
      point["params"], preconditioner, point["probe_batch"], point["key"]))}


def _block_spectra(point: Point) -> dict:
  if not point["first_point"]:
    return {"block_spectra": None}
  densities = jax.device_get(point.programs.block_spectra(point["params"],
                                                          point["probe_batch"], point["key"]))
  js = spectrum.js_distances(densities)
  return {"block_spectra": {
      "blocks": list(densities),
      "nodes": [np.asarray(n).tolist() for n, _ in densities.values()],
      "weights": [np.asarray(w).tolist() for _, w in densities.values()],
      "js_distances": js.distances.tolist(), "js_mean": js.mean}}


def _clip(point: Point) -> dict:
  return {"clip": jax.device_get(point["clip_statistics"])}


MEASUREMENTS = (
    Measurement(
        "first_order", ("params", "directions", "probe_batch", "names"), _first_order,
        fields={"loss": "the probe-batch loss at x",
                "projection": "per direction: ⟨∇f, u⟩/‖u‖ (Eq. 1's first-order term)",
                "cosine": "per direction: cos(∇f, u)",
                "inner_product": "per direction: ⟨∇f, u⟩",
                "norm": "per direction: ‖u‖",
                "histograms": "{sgd, adam, adafactor: (counts of log10 |u_i| in 64 bins, "
                              "exact zeros)}"},
        produces=("test_grads", "norm_sq"), programs=("first_order",),
        cost=lambda s: Cost(gradients=1)),
    Measurement(
        "sharpness", ("params", "directions", "test_grads", "probe_batch", "names", "norm_sq"),
        _sharpness,
        fields={"sharpness": "per direction: uᵀ∇²f(x)u/‖u‖², exact (Taylor mode), raw",
                "sharpness_robust": "per direction: Eq. 4's value at x + δu/‖u‖ where the raw "
                                    "one is negative, else the raw one",
                "shifted": "per direction: whether the raw value was negative"},
        produces=("sharpness",), programs=("second_derivatives",),
        # the raw values and, where some are negative, Eq. 4's shifted ones
        cost=lambda s: Cost(second_derivatives=2 * s.width)),
    Measurement(
        "landscape", ("params", "directions", "probe_batch"), _landscape,
        fields={"landscape": "K × S: the probe-batch loss at x + s·u/‖u‖"},
        programs=("landscape",), cost=lambda s: Cost(forwards=s.directions * s.steps),
        off=lambda p: None if len(p.landscape_steps) > 1 else "landscape_steps=(0.0,)"),
    Measurement(
        "block_sharpness", ("params", "directions", "test_grads", "probe_batch", "names",
                            "norm_sq", "sharpness"), _block_sharpness,
        fields={"block_sharpness": "{directions: the D directions split (the preset's "
                                   "block_sharpness_directions, or every probe update), "
                                   "blocks: the parameter blocks by kind, diagonal: D × B "
                                   "values u_bᵀ∇²f u_b/‖u‖², cross_share: per direction "
                                   "1 − Σ_b diagonal / sharpness}"},
        programs=("second_derivatives",),
        cost=lambda s: Cost(second_derivatives=s.width * -(-s.block_directions * s.blocks
                                                           // s.width))),
    Measurement("sgd_direction", ("directions", "names"), _sgd_direction,
                produces=("sgd_update",)),
    Measurement(
        "attribution", ("params", "directions", "names", "sgd_update", "test_grads",
                        "probe_batch"), _attribution,
        fields={"attribution": "SGD's direction: {fractions, sharpness, share (of uᵀHu carried "
                               "by the top fraction by |u|), norm_share, share_by_gradient, "
                               "norm_share_by_gradient, sharpness_without (top by |u| "
                               "removed), sharpness_clipped, sharpness_without_by_gradient}, "
                               "per fraction"},
        programs=("attribution", "second_derivatives"),
        cost=lambda s: Cost(hessian_vector_products=1, second_derivatives=s.width)),
    Measurement(
        "hessian_diagonal", ("params", "directions", "probe_batch", "sample", "diagonal_here",
                             "test_grads", "sgd_update"), _hessian_diagonal,
        fields={"curvature_sample": "{leaf_shapes, hessian_diagonal: {leaf: exact H_ii at the "
                                    "sampled coordinates}, gradient, sgd_update: the same "
                                    "coordinates of the probe-batch gradient and of SGD's "
                                    "direction}"},
        programs=("second_derivatives",),
        cost=lambda s: Cost(second_derivatives=s.width * s.diagonal_calls),
        off=lambda p: None if p.curvature_samples > 0 else "curvature_samples=0"),
    Measurement(
        "lambda_max", ("params", "probe_batch", "key"), _lambda_max,
        fields={"lambda_max": "λ_max of the probe-batch Hessian (Lanczos)"},
        programs=("top_eigenvalue",),
        cost=lambda s: Cost(hessian_vector_products=s.lanczos_iterations),
        off=lambda p: None if p.lanczos_iterations > 0 else "lanczos_iterations=0"),
    Measurement(
        "preconditioned_sharpness", ("params", "probe_batch", "key", "adam_preconditioner"),
        _preconditioned_sharpness,
        fields={"preconditioned_sharpness": "λ_max(P⁻¹H) of the probe-batch Hessian with "
                                            "P = √v̂ + ε of the Adam probe's live state "
                                            "(Lanczos; Cohen et al. 2022), or None without "
                                            "an Adam probe"},
        programs=("preconditioned_top_eigenvalue",),
        cost=lambda s: Cost(hessian_vector_products=s.lanczos_iterations),
        off=lambda p: None if p.lanczos_iterations > 0 else "lanczos_iterations=0"),
    Measurement(
        "block_spectra", ("params", "probe_batch", "key", "first_point"), _block_spectra,
        fields={"block_spectra": "at a unit's first probe point (else None): {blocks (by "
                                 "kind), nodes and weights: each block's SLQ quadrature, "
                                 "js_distances: B × B Jensen-Shannon distances of the "
                                 "smoothed densities, js_mean: their mean over pairs}"},
        programs=("block_spectra",),
        cost=lambda s: Cost(hessian_vector_products=s.block_spectrum_matvecs),
        off=lambda p: None if p.block_spectrum_steps > 0 else "block_spectrum_steps=0"),
    Measurement(
        "clip", ("clip_statistics",), _clip,
        fields={"clip": "{clipped probe: {threshold, clipped_fraction, norm_before, "
                        "norm_after}} of the step the directions come from"}),
)
BY_NAME = {m.name: m for m in MEASUREMENTS}


def off_reason(measurement: Measurement, preset) -> str | None:
  """Why ``preset`` switches ``measurement`` off (its own setting, or the preset's
  ``skip_measurements``), or None."""
  if measurement.name in getattr(preset, "skip_measurements", ()):
    return f"skip_measurements={tuple(preset.skip_measurements)}"
  return measurement.off(preset)


def active(preset, measurements=MEASUREMENTS) -> list:
  """The measurements ``preset`` leaves switched on, in order."""
  return [m for m in measurements if off_reason(m, preset) is None]


def _release(value) -> None:
  """Frees the device buffers of a value the point no longer needs."""
  for leaf in jax.tree.leaves(value):
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      leaf.delete()


def measure(programs: Programs, inputs: dict, preset, measurements=MEASUREMENTS) -> dict:
  """Runs the switched-on ``measurements`` at one point; returns their record fields.

  ``inputs`` are the point's inputs (see the module docstring); ``directions`` is consumed.
  A value is dropped (its device buffers freed, unless the caller owns it) right after the
  last measurement that reads it, and the host's freed memory goes back to the system after
  every measurement (`experiments.host_memory`: on a CPU the freed buffers and each
  program's compile-time memory would otherwise stay in the process).
  """
  chosen = active(preset, measurements)
  last_reader = {}
  for index, m in enumerate(chosen):
    for name in m.reads:
      last_reader[name] = index
  values, record = dict(inputs), {}
  for index, m in enumerate(chosen):
    missing = [name for name in m.reads if name not in values]
    if missing:
      raise ValueError(f"measurement {m.name!r} reads {missing}, which no input or earlier "
                       "measurement provides")
    out = m.run(Point(programs, values, preset))
    record.update({field: out[field] for field in m.fields})
    values.update({name: out[name] for name in m.produces})
    for name in [n for n, last in last_reader.items() if last == index]:
      value = values.pop(name)
      if name not in CALLER_OWNED:
        _release(value)
    host_memory.return_freed()
  return record


def point_cost(shape: Shape, preset, measurements=MEASUREMENTS) -> Cost:
  """The summed `Cost` of the switched-on measurements at one point of ``shape``."""
  costs = [m.cost(shape) for m in active(preset, measurements)]
  return Cost(*(sum(c[i] for c in costs) for i in range(len(Cost._fields))))

