"""Coordinate-wise clipping to the top-k% magnitude (Pan & Li 2023, Section 4.1).

The clipped gradient is ĝ_i = sgn(g_i) · min(``|g_i|``, τ), where τ is the k-th largest ``|g_i|`` over
all finite coordinates of all floating-point leaves, k = ⌈fraction · n⌉.

Finding τ exactly is a selection problem; `optclip._selection` solves it on the float bit
pattern with a few reductions per leaf (no sort of the coordinates, no gather). This module
is the public face: it validates ``fraction``, dispatches (small trees are concatenated
first, which only saves compile time; sharded leaves are searched in a `shard_map`), and
clips.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _selection
from optclip.sharding import explicit_spec

__all__ = [
    "CoordClipState",
    "clip_threshold",
    "clip_to_threshold",
    "clip_with_state",
    "coord_clip",
    "init_clip_state",
    "validate_fraction",
]

def validate_fraction(value: Any, name: str) -> Any:
  """A clipping fraction checked once at the public boundary.

  Returns a Python float for a number in (0, 1] (the threshold's search is compiled for
  it); an array (a jax or NumPy scalar array, or a value traced under `jit` or
  `optax.inject_hyperparams`) comes back as a float32 array, read as float32 by the search
  and compiled once for every value. A traced value can only be checked for shape.

  Raises:
    ValueError: naming ``name`` when the value is not a real number in (0, 1].
  """
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    return value
  is_number = isinstance(value, numbers.Real) or (
      isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
      and np.issubdtype(np.asarray(value).dtype, np.number))
  if not is_number or isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  number = float(value)
  if not 0.0 < number <= 1.0:  # also rejects NaN
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  if isinstance(value, (np.ndarray, jax.Array)):  # an array: one compile for every value
    return jnp.asarray(value, jnp.float32)
  return number


def _is_float_leaf(leaf: Any) -> bool:
  return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _is_sharded(x) -> bool:
  return explicit_spec(x) is not None


def _sharded_threshold_keys(float_leaves, fraction, per_leaf: bool, hint=None):
  """The search on explicitly sharded leaves, in a `shard_map` over their mesh.

  Every device searches on its own blocks; each pass combines the per-leaf partial counts
  (or extremes) locally and then all-reduces one small (groups, pivots) table, so the
  communication per pass is a few scalars whatever the model size. Gathering a sample
  across devices would cost more than the whole search, so the first pivots come from the
  mean ``|g|``.
  """
  mesh = next(jax.typeof(l).sharding.mesh for l in float_leaves if _is_sharded(l))
  axes = tuple(mesh.axis_names)
  specs = tuple(explicit_spec(l) or jax.sharding.PartitionSpec() for l in float_leaves)
  sizes = tuple(int(l.size) for l in float_leaves)
  traced = not isinstance(fraction, float)

  def used_axes(spec):
    names = set()
    for entry in spec:
      names.update(entry if isinstance(entry, tuple) else (entry,))
    return names

  def local(fraction_value, hint_value, *blocks):
    weights, replicated_over = [], []
    for spec in specs:
      first = jnp.ones((), jnp.int32)
      for axis in axes:
        if axis not in used_axes(spec):  # replicated along axis: count one copy only
          first = first * (jax.lax.axis_index(axis) == 0).astype(jnp.int32)
      weights.append(first)
      replicated_over.append(tuple(a for a in axes if a not in used_axes(spec)))
    across = _selection.Across(axes, tuple(weights), sizes, tuple(replicated_over))
    return _selection.kth_largest_keys(
        list(blocks), fraction_value if traced else fraction, per_leaf=per_leaf,
        across=across, sample=False, hint=None if hint is None else hint_value)

  fraction_arg = jnp.asarray(fraction, jnp.float32) if traced else jnp.zeros(())
  hint_arg = jnp.zeros(()) if hint is None else hint
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(local, mesh=mesh, in_specs=(replicated, replicated) + specs,
                       out_specs=(replicated,) * 3, check_vma=False)(
                           fraction_arg, hint_arg, *float_leaves)


def _threshold_values(float_leaves, fraction, per_leaf: bool, hint=None):
  """The one dispatcher: per-group thresholds as values of the key float dtype, the number
  of narrowing passes the search ran (for the benchmarks) and the per-group counts of
  finite coordinates. ``hint``: (G,) values near the answer, or None."""
  fmt = _selection.key_format([l.dtype for l in float_leaves])
  if any(_is_sharded(l) for l in float_leaves):
    keys, passes, finite = _sharded_threshold_keys(float_leaves, fraction, per_leaf, hint)
  else:
    keys, passes, finite = _selection.kth_largest_keys(float_leaves, fraction,
                                                       per_leaf=per_leaf, hint=hint)
  return _selection.key_to_value(keys, fmt), passes, finite


# Compiled once per tree structure (and static fraction), also when called eagerly: an eager
# `lax.while_loop` would otherwise be traced and compiled again at every call.
_threshold_static_fraction = jax.jit(_threshold_values, static_argnums=(1, 2))
_threshold_traced_fraction = jax.jit(_threshold_values, static_argnums=(2,))


def _hint_values(hint, tree, per_leaf: bool):
  """A `clip_threshold` hint as (G,) float32 values, or None (no hint)."""
  if hint is None:
    return None
  if not per_leaf:
    value = jnp.asarray(hint, jnp.float32)
    if value.shape != ():
      raise ValueError(f"clip_threshold: hint must be a scalar (last step's τ), got shape "
                       f"{value.shape}")
    return value[None]
  # Per-leaf thresholds are None at non-floating leaves, which flattening drops: what is
  # left lines up with the floating leaves.
  values = [jnp.asarray(t, jnp.float32) for t in jax.tree.leaves(hint)]
  floats = sum(_is_float_leaf(leaf) for leaf in jax.tree.leaves(tree))
  if len(values) != floats or any(v.shape != () for v in values):
    raise ValueError("clip_threshold: with per_leaf=True, hint must be a tree of scalars "
                     f"like the per-leaf thresholds ({floats} floating leaves), got "
                     f"{len(values)} leaves")
  return jnp.stack(values) if values else None


def _threshold_and_finite_count(tree: Any, fraction, per_leaf: bool, hint=None):
  """(`clip_threshold` for a fraction that `validate_fraction` has already checked, the
  int32 count of finite coordinates over all floating leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  float_positions = [i for i, l in enumerate(leaves) if _is_float_leaf(l)]
  float_leaves = [jnp.asarray(leaves[i]) for i in float_positions]
  if not float_leaves:
    no_coordinates = jnp.zeros((), jnp.int32)
    if per_leaf:
      return jax.tree.unflatten(treedef, [None] * len(leaves)), no_coordinates
    return jnp.asarray(jnp.inf, jnp.float32), no_coordinates
  search = (_threshold_static_fraction if isinstance(fraction, float)
            else _threshold_traced_fraction)
  values, _, finite = search(float_leaves, fraction, per_leaf,
                             _hint_values(hint, tree, per_leaf))
  if not per_leaf:
    return (values[0].astype(jnp.result_type(*[l.dtype for l in float_leaves])),
            jnp.sum(finite))
  out = [None] * len(leaves)
  for group, i in enumerate(float_positions):
    out[i] = values[group].astype(float_leaves[group].dtype)
  return jax.tree.unflatten(treedef, out), jnp.sum(finite)


def _threshold(tree: Any, fraction, per_leaf: bool, hint=None) -> Any:
  """`clip_threshold` for a fraction that `validate_fraction` has already checked."""
  return _threshold_and_finite_count(tree, fraction, per_leaf, hint)[0]


def clip_threshold(tree: Any, fraction: float | jax.Array, *, per_leaf: bool = False,
                   hint: Any = None) -> Any:
  """The coordinate-wise clipping threshold τ of a pytree.

  τ is the k-th largest ``|g|`` over the finite coordinates of the floating-point leaves, with
  k = ⌈fraction · n⌉ for n finite coordinates: NumPy's float64 ``ceil(fraction * n)``, at
  least 1 (a traced fraction is read as float32 first). τ equals
  ``np.sort(np.abs(finite_values))[::-1][k - 1]`` bit for bit. Non-floating leaves (ints,
  bools) and ``None`` leaves are ignored. A tree without finite coordinates has τ = +inf.

  The search selects on the float bit pattern with a few reductions per leaf and never sorts
  the coordinates (see `optclip._selection`). Trees of at most 2^18 coordinates are
  concatenated first (a copy of at most 1 MiB that only saves compile time); in larger trees
  only the leaves under 2^14 coordinates are (ResNet-152: 313 of 467 leaves, 0.3% of its
  coordinates; its search compiles 3.3x faster). Per-leaf thresholds never concatenate, and
  sharded leaves are searched where they lie, exchanging a few scalars per pass.

  Args:
    tree: a pytree of arrays (gradients, updates, ...).
    fraction: the fraction of coordinates at or above τ, in (0, 1]. May be traced.
    per_leaf: if True, compute one threshold per floating-point leaf.
    hint: optional, a threshold near the answer (last step's τ; with ``per_leaf`` a tree
      of them like the result). The first pass then also brackets the answer around it,
      which saves passes when it is close; τ is the same bit for bit with or without it
      (a non-finite hint, such as the initial state's +inf, is ignored).

  Returns:
    A scalar in the promoted dtype of the floating leaves, or with ``per_leaf=True`` a pytree
    shaped like ``tree`` with a scalar per floating leaf and ``None`` elsewhere.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> float(optclip.clip_threshold({'a': jnp.array([3., -1.]), 'b': jnp.array([2., 0.5])}, 0.5))
    2.0

  References:
    Pan & Li 2023, arXiv 2306.00204, Section 4.1.
  """
  return _threshold(tree, validate_fraction(fraction, "fraction"), per_leaf, hint)


def _threshold_for_dtype(threshold, dtype):
  """Casts τ to a leaf dtype, rounding toward zero so that |ĝ| <= τ still holds."""
  cast = jnp.asarray(threshold).astype(dtype)
  too_big = cast.astype(jnp.float32) > jnp.asarray(threshold).astype(jnp.float32)
  return jnp.where(too_big, jnp.nextafter(cast, jnp.zeros((), dtype)), cast)


def clip_to_threshold(tree: Any, threshold: Any) -> Any:
  """ĝ_i = sgn(g_i) · min(``|g_i|``, τ) on floating leaves; other leaves and non-finite entries pass.

  Args:
    tree: a pytree of arrays.
    threshold: a scalar τ, or a pytree of scalars matching ``tree`` (as returned by
      ``clip_threshold(..., per_leaf=True)``).

  Returns:
    A pytree like ``tree``, dtypes kept.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> optclip.clip_to_threshold({"g": jnp.array([3., -0.5, -2.])}, 1.0)["g"]
    Array([ 1. , -0.5, -1. ], dtype=float32)
  """
  def clip_leaf(g, tau):
    if not _is_float_leaf(g):
      return g
    g = jnp.asarray(g)  # a Python float leaf, as optax allows
    tau = _threshold_for_dtype(tau, g.dtype)
    return jnp.where(jnp.isfinite(g), jnp.clip(g, -tau, tau), g)

  if isinstance(threshold, (jax.Array, np.ndarray, numbers.Real)):
    return jax.tree.map(lambda g: clip_leaf(g, threshold), tree)
  return jax.tree.map(lambda g, t: clip_leaf(g, t) if t is not None else g, tree, threshold,
                      is_leaf=lambda x: x is None)


class CoordClipState(NamedTuple):
  """What the last clip did, for logging: `coord_clip`'s state, and a field of every clipped
  optimizer's state.

  Fields (before the first update: τ = +inf, nothing clipped, norms 0):

  * ``threshold``: τ, a scalar in the gradient's float dtype. With ``per_leaf=True`` a
    pytree shaped like the parameters, one scalar τ per float leaf (None elsewhere). The
    next update's search starts from it (`clip_threshold`'s ``hint``); results never
    depend on it, only the number of passes does.
  * ``clipped_count``: int32 scalar, the finite coordinates with ``|g|`` > τ, i.e. those the
    clip changed, over all leaves (also with ``per_leaf=True``). Coordinates *equal* to τ
    (the k-th largest itself and its ties) are not counted, so at ``fraction=0.5`` this
    reads ⌈n/2⌉ - 1 or fewer, and ``clipped_fraction`` just under 50%.
  * ``clipped_fraction``: float32 scalar, ``clipped_count`` / the number of finite
    coordinates.
  * ``norm_before``, ``norm_after``: float32 scalars, ‖g‖₂ and ‖ĝ‖₂ over the float leaves
    (NaN/Inf coordinates make them NaN/Inf).

  Read one clip's field with ``optax.tree_utils.tree_get(state, "clipped_fraction")``;
  where an optimizer clips twice (``clip`` and ``clip_update``) `clip_states` lists both.
  """
  threshold: Any
  clipped_count: jax.Array
  clipped_fraction: jax.Array
  norm_before: jax.Array
  norm_after: jax.Array


def clip_states(state) -> dict:
  """{path: `CoordClipState`} of every clip inside an optimizer state, by its path.

  Args:
    state: an optimizer state (any pytree).

  Returns:
    A dict from `jax.tree_util.keystr` paths to the states, in tree order (empty where
    nothing clips).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.adam(0.1, clip=0.5, clip_update=0.5)
    >>> state = tx.update(jnp.array([3., -1., 2.]), tx.init(jnp.zeros(3)))[1]
    >>> {path: round(float(s.threshold), 3) for path, s in optclip.clip_states(state).items()}
    {'[0].clip': 2.0, '[1]': 1.0}
  """
  leaves = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda node: isinstance(node, CoordClipState))[0]
  return {jax.tree_util.keystr(path): node for path, node in leaves
          if isinstance(node, CoordClipState)}


def init_clip_state(params, per_leaf: bool = False) -> CoordClipState:
  """The `CoordClipState` before any update, shaped for ``params``."""
  leaves = [l for l in jax.tree.leaves(params) if _is_float_leaf(l)]
  dtype = (_selection.key_format([jnp.result_type(l) for l in leaves]).float_dtype if leaves
           else jnp.float32)
  threshold = jnp.asarray(jnp.inf, dtype)
  if per_leaf:
    threshold = jax.tree.map(lambda p: threshold if _is_float_leaf(p) else None, params)
  zero = jnp.zeros((), jnp.float32)
  return CoordClipState(threshold, jnp.zeros((), jnp.int32), zero, zero, zero)


def _clip_statistics(tree, threshold, finite, like: CoordClipState,
                     per_leaf: bool) -> CoordClipState:
  """One variadic reduction per leaf (a single pass, as in the threshold search): the
  clipped count (int32) and both squared norms (float32), the clipped one from ``|g|`` and
  τ so that ĝ is never stored for it. ``finite``, the count of finite coordinates, comes
  from the search's first pass (as a fourth operand here it cost a quarter of this pass)."""
  taus = (jax.tree.leaves(threshold) if per_leaf
          else [threshold] * len(jax.tree.leaves(tree)))
  zeros = (jnp.zeros((), jnp.int32),) + (jnp.zeros((), jnp.float32),) * 2
  add = lambda x, y: tuple(a + b for a, b in zip(x, y))
  totals = zeros
  for g, tau in zip([jnp.asarray(g) for g in jax.tree.leaves(tree) if _is_float_leaf(g)],
                    taus):
    magnitude = jnp.abs(g.astype(jnp.float32))
    is_finite = magnitude < jnp.inf  # NaN compares false
    tau = tau.astype(jnp.float32)
    kept = jnp.where(is_finite, jnp.minimum(magnitude, tau), magnitude)
    operands = ((is_finite & (magnitude > tau)).astype(jnp.int32), magnitude * magnitude,
                kept * kept)
    totals = add(totals, jax.lax.reduce(operands, zeros, add, tuple(range(g.ndim))))
  count, before, after = totals
  if per_leaf:
    recorded = jax.tree.map(lambda t, old: jnp.asarray(t, old.dtype), threshold, like.threshold)
  else:
    recorded = jnp.asarray(threshold, like.threshold.dtype)
  return CoordClipState(recorded, count,
                        count.astype(jnp.float32) / jnp.maximum(finite, 1).astype(jnp.float32),
                        jnp.sqrt(before), jnp.sqrt(after))


# Compiled once per tree structure also when called eagerly: the reduction's combiner is a
# fresh function at every trace, so an eager call would otherwise compile it every step.
_clip_statistics_compiled = jax.jit(_clip_statistics, static_argnums=(4,))


def clip_with_state(tree, fraction, state: CoordClipState, *, per_leaf: bool = False):
  """(ĝ, the new `CoordClipState`) for a ``fraction`` already checked by `validate_fraction`.

  The clip that `coord_clip` and the clipped optimizers share.
  """
  # Last step's τ (the state's) warm-starts the search; the answer is exact either way.
  threshold, finite = _threshold_and_finite_count(tree, fraction, per_leaf,
                                                  hint=state.threshold)
  return clip_to_threshold(tree, threshold), _clip_statistics_compiled(
      tree, threshold, finite, state, per_leaf)


def coord_clip(fraction: float | jax.Array, *, per_leaf: bool = False
               ) -> optax.GradientTransformation:
  """Clips every coordinate to the magnitude of the top-``fraction`` coordinates.

  Update rule, with τ = `clip_threshold(g, fraction, per_leaf=per_leaf)`:

    ĝ_i = sgn(g_i) · min(``|g_i|``, τ)

  so the ⌈fraction · n⌉ largest coordinates (and their ties) are set to ±τ and the rest pass
  unchanged. NaN/Inf coordinates are excluded from τ and pass through, so
  `optax.apply_if_finite` still sees them. Non-floating and ``None`` leaves pass through; every
  leaf keeps its dtype. Works under `jit`, `optax.inject_hyperparams` (a traced ``fraction``),
  `optax.masked` and `optax.MultiSteps`.

  Args:
    fraction: fraction of coordinates to clip, in (0, 1]; ``fraction=1`` clips everything to
      the smallest ``|g|``.
    per_leaf: one threshold per leaf instead of one over all parameters.

  Returns:
    An `optax.GradientTransformation` whose state (`CoordClipState`) records what the last
    update did: τ, how many coordinates were clipped, and ‖g‖ before and after.

  Example:
    >>> import jax.numpy as jnp, optax, optclip
    >>> tx = optax.chain(optclip.coord_clip(0.5), optax.sgd(1.0))
    >>> params = jnp.array([1., 2., 3., 4.])
    >>> updates, _ = tx.update(jnp.array([4., -3., 2., 1.]), tx.init(params))
    >>> updates
    Array([-3.,  3., -2., -1.], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Section 4.1 and Figure 5.
  """
  fraction = validate_fraction(fraction, "fraction")

  def init_fn(params):
    return init_clip_state(params, per_leaf)

  def update_fn(updates, state, params=None):
    del params
    return clip_with_state(updates, fraction, state, per_leaf=per_leaf)

  return optax.GradientTransformation(init_fn, update_fn)
