"""Coordinate-wise clipping to the top-k% magnitude (Pan & Li 2023, Section 4.1).

The clipped gradient is ĝ_i = sgn(g_i) · min(|g_i|, τ), where τ is the k-th largest |g_i| over
all finite coordinates of all floating-point leaves, k = ⌈fraction · n⌉.

Finding τ exactly is a selection problem. Concatenating the leaves and sorting (what
`jnp.quantile` does) costs seconds at 10M coordinates, so this module selects on the float bit
pattern instead: for non-negative IEEE floats, the order of the values is the order of their
bits read as integers ("keys"). A bracket [lo, hi) of keys with count(|g| ≥ lo) ≥ k >
count(|g| ≥ hi) is narrowed until it holds one key. Each narrowing step is a handful of
per-leaf reductions (never a gather or a sort of the data). On sharded leaves the search runs
in a `shard_map`: per-device partial counts are combined across leaves and all-reduced once
per step, a few scalars. The pivots of each step come from a small strided sample (first
step), from interpolation of the exact counts (later steps), and from "snapping" the bracket
to the largest and smallest element inside it; a key-space quartering when a step stalls
bounds the worst case. An answer among the 64 largest elements below hi is finished by a
two-level top_k (row maxima, then the gathered rows).

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip.sharding import explicit_spec

__all__ = [
    "CoordClipState",
    "clip_threshold",
    "clip_to_threshold",
    "coord_clip",
    "validate_fraction",
]

# Target size of the strided sample that seeds the first bracket. Its sort is the only sort in
# the selection; 16K elements sort in a few milliseconds on a CPU core.
_SAMPLE_SIZE = 16384
# Sample ranks of the first pivots, in standard deviations of the sample quantile around k.
_SAMPLE_Z = (-4.0, -1.0, 1.0, 4.0)
# Later pivots: count targets k + spread · these (see _interpolated_pivots), with
# spread = width · _SPREAD_LINEAR + sqrt(width) · _SPREAD_NOISE + 1.
_INTERP_SPREADS = (1.0, -1.0)
_SPREAD_LINEAR = 1 / 256
_SPREAD_NOISE = 1.0
# A bracket whose answer is among its _TOP_K largest elements is finished by a two-level top_k.
_TOP_K = 64
_MAX_STEPS = 200


def validate_fraction(value: Any, name: str) -> Any:
  """Checks that a clipping fraction is a number in (0, 1]; returns it unchanged.

  Traced values (under `jit` or `optax.inject_hyperparams`) can only be checked for shape.

  Raises:
    ValueError: naming `name` when the value is not a real number in (0, 1].
  """
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    return value
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  if isinstance(value, (np.ndarray, jax.Array)):
    if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.floating) and \
        not np.issubdtype(np.asarray(value).dtype, np.integer):
      raise ValueError(f"{name} must be a scalar number in (0, 1], got {value!r}")
  number = float(value)
  if not 0.0 < number <= 1.0:  # also rejects NaN
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  return value


def _is_float_leaf(leaf: Any) -> bool:
  return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


class _Bits(NamedTuple):
  """Constants of the float format that the keys are read in."""
  float_dtype: Any
  key_dtype: Any
  precision: int  # significand bits including the implicit one (24 for float32)
  bias: int
  max_exp: int
  inf_key: int
  min_fast_key: int  # key of 2^(precision - max_exp + 2): see _below_indicator
  one_key: int  # key of 1.0


def _bits_for(dtypes: Sequence[Any]) -> _Bits:
  # bfloat16 and float16 widen to float32 exactly, so float32 keys order all of them; float64
  # (with jax_enable_x64) needs 64-bit keys.
  if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
    return _Bits(jnp.float64, jnp.int64, 53, 1023, 1024, 0x7FF0000000000000, 54 << 52,
                 0x3FF0000000000000)
  return _Bits(jnp.float32, jnp.int32, 24, 127, 128, 0x7F800000, 25 << 23, 0x3F800000)


def _key_to_value(key, bits: _Bits):
  return jax.lax.bitcast_convert_type(key.astype(bits.key_dtype), bits.float_dtype)


def _value_to_key(value, bits: _Bits):
  return jax.lax.bitcast_convert_type(value.astype(bits.float_dtype), bits.key_dtype)


def _below_indicator(a, pivot_keys, bits: _Bits):
  """1.0 where a < pivot, 0.0 where a >= pivot, for finite a >= 0; exact and compare-free.

  Shapes: a (...), pivot_keys (P,) -> (P, ...). XLA on CPU vectorises float min/mul/add
  reductions but not compare/select or integer ones (measured 2-3x slower), so the comparison
  is arithmetic: t - min(a, t) is zero exactly when a >= t and otherwise at least 2^(e - p)
  for t in [2^e, 2^(e+1)); scaling it by 2^(p - e) and capping at 1 gives the indicator.
  Exact for pivots t >= 2^(p - max_exp + 2) (``bits.min_fast_key``, 2^-102 in float32):
  there 2^(e - p) is a normal number (CPUs flush subnormals to zero) and the scale is finite.
  Callers count smaller pivots on the integer keys.
  """
  pivot_keys = pivot_keys.astype(bits.key_dtype)
  exponent = (pivot_keys >> (bits.precision - 1)).astype(jnp.int32) - bits.bias
  scale = jnp.ldexp(jnp.ones((), bits.float_dtype), bits.precision - exponent)
  expand = (slice(None),) + (None,) * a.ndim
  t = _key_to_value(pivot_keys, bits)[expand]
  return jnp.minimum((t - jnp.minimum(a[None], t)) * scale[expand], 1)


def _exact_counts(indicator) -> jax.Array:
  """Sums a (P, ...) 0/1 float array over all but the first axis, exactly, as int32."""
  axes = tuple(range(1, indicator.ndim))
  per_row = indicator[0].size
  limit = 2 ** 24 if indicator.dtype == jnp.float32 else 2 ** 53
  if per_row < limit:
    return jnp.sum(indicator, axis=axes).astype(jnp.int32)
  if indicator.ndim >= 3 and indicator.shape[-1] < limit:
    return jnp.sum(jnp.sum(indicator, axis=-1).astype(jnp.int32), axis=axes[:-1])
  return jnp.sum(indicator.astype(jnp.int32), axis=axes)


class _Across(NamedTuple):
  """How per-device partial results combine into global ones.

  Unsharded: no axes, nothing to do. Inside the `shard_map` of `_sharded_threshold_keys`,
  every leaf is this device's block: sums are masked to one copy of each block (``weights``:
  1 on the first device along every mesh axis the leaf is replicated over, else 0) and then
  summed over all mesh axes; maxima need no mask. Each pass of a search is one all-reduce of
  a few scalars.
  """
  axes: tuple = ()
  weights: tuple | None = None  # per leaf, None when unsharded
  sizes: tuple | None = None  # global leaf sizes, None when unsharded

  def global_sizes(self, leaves) -> list:
    return list(self.sizes) if self.sizes is not None else [int(l.size) for l in leaves]

  def weighted(self, values):
    if self.weights is None:
      return list(values)
    return [v * w.astype(v.dtype) for v, w in zip(values, self.weights)]

  def sum(self, x):
    return jax.lax.psum(x, self.axes) if self.axes else x

  def max(self, x):
    return jax.lax.pmax(x, self.axes) if self.axes else x


_UNSHARDED = _Across()


class _Problem(NamedTuple):
  """One selection problem: leaves split into groups, each group with its own k."""
  raw_leaves: list  # the floating leaves as given; |g| is taken inside every pass (fused)
  group_of_leaf: list  # static group index per leaf
  num_groups: int
  k: jax.Array  # (G,) int32, 1 <= k <= n (k = 0 marks a group with no finite coordinate)
  n: jax.Array  # (G,) int32 finite coordinates per group
  bits: _Bits
  gather_ok: bool  # False for sharded leaves: no top_k or sample gather, only reductions
  finite_only: bool  # True when every entry is known to be finite
  across: _Across = _UNSHARDED

  def magnitude(self, raw):
    """|g| in the key float dtype, non-finite entries zeroed."""
    if self.finite_only:
      return jnp.abs(raw).astype(self.bits.float_dtype)
    return jnp.where(jnp.isfinite(raw), jnp.abs(raw), 0).astype(self.bits.float_dtype)

  @property
  def leaves(self):
    """`magnitude` of every leaf; recomputed (fused) per pass, never stored."""
    return [self.magnitude(l) for l in self.raw_leaves]


def _group_combine(per_leaf: list, problem: _Problem, combine, fill):
  """Combines per-leaf arrays of shape (P,) into per-group arrays of shape (G, P).

  ``combine`` is jnp.add or jnp.maximum; across devices (see `_Across`) the table is then
  summed or maximised in one collective.
  """
  if combine is jnp.add:
    per_leaf = problem.across.weighted(per_leaf)
  table = _local_group_combine(per_leaf, problem, combine, fill)
  return problem.across.sum(table) if combine is jnp.add else problem.across.max(table)


def _local_group_combine(per_leaf: list, problem: _Problem, combine, fill):
  rows = [None] * problem.num_groups
  for value, group in zip(per_leaf, problem.group_of_leaf):
    rows[group] = value if rows[group] is None else combine(rows[group], value)
  width = per_leaf[0].shape[0] if per_leaf else 1
  return jnp.stack([r if r is not None else jnp.full((width,), fill) for r in rows])


def _keys(problem: _Problem, raw):
  return _value_to_key(problem.magnitude(raw), problem.bits)


# Chunk length of `_reduce_in_chunks` (16 KiB of float32).
_CHUNK = 1 << 12


def _reduce_in_chunks(raw, reduce_chunk, combine):
  """``reduce_chunk`` over fixed-size pieces of the flattened leaf, combined in a loop.

  For passes XLA cannot fuse into their reduction on CPU (integer compares and selects): it
  would store a full-size intermediate per leaf, and its scheduler keeps every leaf's alive
  at once. Chunked, a pass holds one chunk's intermediates per leaf.
  """
  flat = raw.reshape(-1)
  full = flat.shape[0] // _CHUNK
  if not full:
    return reduce_chunk(flat)
  result = jax.lax.fori_loop(
      1, full, lambda i, acc: combine(acc, reduce_chunk(
          jax.lax.dynamic_slice_in_dim(flat, i * _CHUNK, _CHUNK))), reduce_chunk(flat[:_CHUNK]))
  if flat.shape[0] % _CHUNK:
    result = combine(result, reduce_chunk(flat[full * _CHUNK:]))
  return result


def _count_ge(problem: _Problem, pivots) -> jax.Array:
  """Exact count of |g| >= pivot per group: pivots (G, P) keys -> (G, P) int32.

  The fast branch compares in float arithmetic (`_below_indicator`), exact for pivots of at
  least 2^-102 (float32). Smaller pivots (a tiny, subnormal or zero threshold, rare) are
  counted by comparing the integer keys instead: exact, but not vectorised by XLA on CPU.
  """
  bits = problem.bits

  def by_values():
    return [leaf.size - _exact_counts(_below_indicator(leaf, pivots[group], bits))
            for leaf, group in zip(problem.leaves, problem.group_of_leaf)]

  def by_keys():
    def count(chunk, group):
      return jnp.sum(_keys(problem, chunk)[None] >= pivots[group][:, None], axis=1,
                     dtype=jnp.int32)
    return [_reduce_in_chunks(raw, functools.partial(count, group=group), jnp.add)
            for raw, group in zip(problem.raw_leaves, problem.group_of_leaf)]

  if not problem.finite_only:  # masking NaN/Inf is a select: unfusable, so chunked keys
    return _group_combine(by_keys(), problem, jnp.add, 0)
  tiny = jnp.any(pivots < bits.min_fast_key)
  per_leaf = jax.lax.cond(tiny, by_keys, by_values)
  return _group_combine(per_leaf, problem, jnp.add, 0)


def _snap(problem: _Problem, lo, hi):
  """Largest key below hi and smallest key at or above lo, per group (max reductions).

  When every lo is at least 2^-102 (float32), float arithmetic (vectorised, fused) is exact
  (see `_below_indicator`); otherwise the integer keys are compared (see `_count_ge`).
  Both extremes come from one max over a stacked (2, ...) expression: two reductions of the
  same |g| would make XLA store |g| between them.
  """
  bits = problem.bits
  inf_key = jnp.asarray(bits.inf_key, bits.key_dtype)

  def combine(per_leaf):  # per leaf: (largest, -smallest)
    table = _group_combine(per_leaf, problem, jnp.maximum, -inf_key)
    return table[:, 0], -table[:, 1]

  def by_values():
    big = jnp.finfo(bits.float_dtype).max
    per_leaf = []
    for leaf, group in zip(problem.leaves, problem.group_of_leaf):
      below = _below_indicator(leaf, jnp.stack([hi[group], lo[group]]), bits)
      expand = (slice(None),) + (None,) * leaf.ndim
      # Row 0: a·[a < hi], whose max is the largest element below hi (0 if none).
      # Row 1: -a - big·[a < lo], whose max is minus the smallest element >= lo.
      sign = jnp.asarray([0, -1], bits.float_dtype)[expand]
      slope = jnp.asarray([1, 0], bits.float_dtype)[expand]
      offset = jnp.asarray([0, -big], bits.float_dtype)[expand]
      rows = sign * leaf[None] + (slope * leaf[None] + offset) * below
      extremes = jnp.max(rows, axis=tuple(range(1, rows.ndim)), initial=-jnp.inf)
      per_leaf.append(jnp.stack([_value_to_key(extremes[0], bits),
                                 -_value_to_key(-extremes[1], bits)]))
    return combine(per_leaf)

  def by_keys():
    def extremes(chunk, group):
      keys = _keys(problem, chunk)
      # Non-finite entries read as zero keys; they must not pose as the smallest element.
      at_least_lo = keys >= lo[group]
      if not problem.finite_only:
        at_least_lo = at_least_lo & jnp.isfinite(chunk)
      rows = jnp.stack([jnp.where(keys < hi[group], keys, 0),
                        -jnp.where(at_least_lo, keys, inf_key)])
      return jnp.max(rows, axis=1, initial=-inf_key)
    return combine([_reduce_in_chunks(raw, functools.partial(extremes, group=group), jnp.maximum)
                    for raw, group in zip(problem.raw_leaves, problem.group_of_leaf)])

  if not problem.finite_only:
    largest, smallest = by_keys()
  else:
    fast = jnp.all(lo >= bits.min_fast_key)
    largest, smallest = jax.lax.cond(fast, by_values, by_keys)
  return largest.astype(bits.key_dtype), smallest.astype(bits.key_dtype)


def _row_view(leaf):
  """A free (rows, length) view of a leaf for the two-level top_k of `_top_below`.

  The finish gathers _TOP_K rows and takes the per-leaf maxima of all rows, so rows of about
  sqrt(size / _TOP_K) elements balance the two; any divisor of the size near that works
  because a row-major reshape is only a relabelling. Without one, the last axis serves.
  """
  size = leaf.size
  target = max(1.0, math.sqrt(size / _TOP_K))
  divisors = [d for d in range(max(1, int(target / 8)), int(target * 8) + 1) if size % d == 0]
  if divisors:
    length = min(divisors, key=lambda d: abs(math.log(d / target)))
  elif leaf.ndim >= 2:
    length = leaf.shape[-1]
  else:
    length = size
  return leaf.reshape(-1, length)


def _top_below(problem: _Problem, hi, r):
  """Key of the r-th largest element below hi per group (r <= _TOP_K), in two levels.

  A full top_k per leaf needs a materialised masked copy of every leaf (and costs about
  four counting passes on CPU). Instead one fused pass takes the largest element below hi
  of every row; the _TOP_K rows with the largest such maxima hold the _TOP_K largest
  elements below hi (ties included: every chosen row with maximum v contributes a v), so
  a top_k over those gathered rows is exact. Comparisons in top_k may treat subnormals as
  zero, so the caller only uses this when the answer is a normal number.
  """
  bits = problem.bits
  candidates = [[] for _ in range(problem.num_groups)]
  for raw, group in zip(problem.raw_leaves, problem.group_of_leaf):
    if not raw.size:
      continue
    # |g| is recomputed from the raw rows on both levels so that it is never stored.
    raw_rows = _row_view(raw)
    rows = problem.magnitude(raw_rows)
    below = _below_indicator(rows, hi[group][None], bits)[0]
    row_max = jnp.max(rows * below, axis=1)  # 0 for rows without an element below hi
    chosen = jax.lax.top_k(row_max, min(_TOP_K, row_max.shape[0]))[1]
    gathered = problem.magnitude(raw_rows[chosen])
    # Zeros never displace real candidates: every element is >= 0.
    masked = jnp.where(gathered < _key_to_value(hi[group], bits), gathered, 0).ravel()
    candidates[group].append(jax.lax.top_k(masked, min(_TOP_K, masked.size))[0])
  answers = []
  for group in range(problem.num_groups):
    if not candidates[group]:
      answers.append(jnp.zeros((), bits.key_dtype))
      continue
    merged = jnp.concatenate(candidates[group])
    top = jax.lax.top_k(merged, min(_TOP_K, merged.size))[0]
    answers.append(_value_to_key(top[jnp.clip(r[group] - 1, 0, top.shape[0] - 1)], bits))
  return jnp.stack(answers)


def _moment_pivots(problem: _Problem):
  """First pivots without a sample (sharded leaves): multiples of the mean |g| per group.

  Gathering a sample across devices would cost more communication than the whole search;
  the mean needs one scalar all-reduce. Later steps interpolate from the exact counts.
  """
  bits = problem.bits
  sums = _group_combine(
      [_reduce_in_chunks(raw, lambda c: jnp.sum(problem.magnitude(c))[None], jnp.add)
       for raw in problem.raw_leaves], problem, jnp.add, 0)
  mean = sums[:, 0] / jnp.maximum(problem.n, 1)
  q = problem.k.astype(jnp.float32) / jnp.maximum(problem.n, 1)
  # Heavier tails and smaller q push the k-th largest above the mean.
  centre = mean * (1 - jnp.log(jnp.clip(q, 1e-7, 1.0)))
  multipliers = jnp.asarray([0.125, 0.5, 2.0, 8.0], bits.float_dtype)
  return _value_to_key(centre[:, None].astype(bits.float_dtype) * multipliers[None], bits)


def _sample_pivots(problem: _Problem):
  """Pivots per group bracketing the k-th largest of a strided sample of each group."""
  bits = problem.bits
  if not problem.gather_ok:
    return _moment_pivots(problem)
  members = [[] for _ in range(problem.num_groups)]
  total = sum(leaf.size for leaf in problem.leaves)
  for leaf, group in zip(problem.leaves, problem.group_of_leaf):
    if leaf.size == 0:
      continue
    share = max(1, int(round(_SAMPLE_SIZE * leaf.size / max(total, 1))))
    if problem.num_groups > 1:  # per-leaf thresholds: every leaf gets its own sample
      share = max(512, _SAMPLE_SIZE // problem.num_groups)
    axis = int(np.argmax(leaf.shape)) if leaf.ndim else 0
    sample = leaf
    if leaf.ndim and leaf.size > share:
      stride = min(leaf.shape[axis], max(1, leaf.size // share))
      sample = jax.lax.slice_in_dim(leaf, 0, leaf.shape[axis], stride, axis)
    members[group].append(jnp.ravel(sample))
  pivots = []
  for group in range(problem.num_groups):
    if not members[group]:
      pivots.append(jnp.zeros((len(_SAMPLE_Z),), bits.key_dtype))
      continue
    sample = jnp.sort(jnp.concatenate(members[group]))[::-1]
    size = sample.shape[0]
    q = problem.k[group].astype(jnp.float32) / jnp.maximum(problem.n[group], 1)
    sigma = jnp.sqrt(size * q * (1 - q)) + 1
    ranks = q * size + jnp.asarray(_SAMPLE_Z) * sigma
    index = jnp.clip(jnp.round(ranks).astype(jnp.int32), 0, size - 1)
    pivots.append(_value_to_key(sample[index], bits))
  return jnp.stack(pivots)


def _interpolated_pivots(problem: _Problem, s: "_LoopState"):
  """Pivots where the counts, linearly interpolated in value, cross k ± a spread.

  Inside a narrow bracket the count is close to linear in the value; the error is a small
  fraction of the bracket plus the counting noise of its elements, ~sqrt(width).
  """
  bits = problem.bits
  k = problem.k.astype(jnp.float32)
  width = jnp.maximum(s.c_lo - s.c_hi, 1).astype(jnp.float32)
  spread = width * _SPREAD_LINEAR + _SPREAD_NOISE * jnp.sqrt(width) + 1
  targets = k[:, None] + spread[:, None] * jnp.asarray(_INTERP_SPREADS)[None]
  fractions = jnp.clip((s.c_lo[:, None] - targets) / width[:, None], 0.0, 1.0)
  lo_value = _key_to_value(s.lo, bits).astype(jnp.float32)
  hi_value = _key_to_value(s.hi, bits).astype(jnp.float32)
  values = lo_value[:, None] + (hi_value - lo_value)[:, None] * fractions
  interp = _value_to_key(values.astype(bits.float_dtype), bits)
  # Key-space quartering bounds the worst case: without a finite upper bound, when the last
  # count step did not halve the bracket, and when few keys are left.
  span = s.hi - s.lo
  count = len(_INTERP_SPREADS)
  quarters = s.lo[:, None] + (span[:, None] // (count + 1)) * jnp.arange(
      1, count + 1, dtype=span.dtype)[None]
  stalled = (s.c_lo - s.c_hi) * 2 > s.width_before_count
  use_quarters = stalled | ~jnp.isfinite(hi_value) | (span <= 64)
  pivots = jnp.where(use_quarters[:, None], quarters, interp)
  return jnp.clip(pivots, (s.lo + 1)[:, None], (s.hi - 1)[:, None])


def _update_bracket(problem: _Problem, s: "_LoopState", pivots, counts) -> "_LoopState":
  """Moves lo up to the highest pivot with count >= k and hi down to the lowest with < k."""
  k = problem.k[:, None]
  key_dtype = s.lo.dtype
  inf_key = jnp.asarray(problem.bits.inf_key, key_dtype)
  ge = counts >= k
  new_lo = jnp.max(jnp.where(ge, pivots, jnp.zeros((), key_dtype)), axis=1)
  new_hi = jnp.min(jnp.where(ge, inf_key, pivots), axis=1)
  c_at_new_lo = jnp.max(jnp.where(ge & (pivots == new_lo[:, None]), counts, -1), axis=1)
  c_at_new_hi = jnp.max(jnp.where(~ge & (pivots == new_hi[:, None]), counts, -1), axis=1)
  raise_lo = (new_lo > s.lo) & s.active
  lower_hi = (new_hi < s.hi) & s.active
  return s._replace(
      lo=jnp.where(raise_lo, new_lo, s.lo), hi=jnp.where(lower_hi, new_hi, s.hi),
      c_lo=jnp.where(raise_lo, c_at_new_lo, s.c_lo),
      c_hi=jnp.where(lower_hi, c_at_new_hi, s.c_hi),
      width_before_count=jnp.where(s.active, s.c_lo - s.c_hi, s.width_before_count),
      just_snapped=jnp.zeros((), bool))


class _LoopState(NamedTuple):
  lo: jax.Array  # (G,) keys with count(|g| >= lo) = c_lo >= k
  hi: jax.Array  # (G,) keys with count(|g| >= hi) = c_hi < k
  c_lo: jax.Array
  c_hi: jax.Array
  width_before_count: jax.Array  # bracket width (elements) before the last count step
  just_snapped: jax.Array
  step: jax.Array

  @property
  def active(self):
    return (self.hi - self.lo) > 1


def _finish(s: _LoopState, solved, answer) -> _LoopState:
  return s._replace(lo=jnp.where(solved, answer, s.lo), hi=jnp.where(solved, answer + 1, s.hi))


def _select(problem: _Problem) -> jax.Array:
  """Key of the k-th largest element per group (the inf key for groups without elements)."""
  bits = problem.bits
  G = problem.num_groups
  empty = problem.k <= 0
  state = _LoopState(
      lo=jnp.zeros((G,), bits.key_dtype), hi=jnp.full((G,), bits.inf_key, bits.key_dtype),
      c_lo=problem.n, c_hi=jnp.zeros((G,), jnp.int32), width_before_count=problem.n,
      just_snapped=jnp.zeros((), bool), step=jnp.zeros((), jnp.int32))
  pivots = jnp.clip(_sample_pivots(problem), (state.lo + 1)[:, None],
                    (state.hi - 1)[:, None])
  state = _update_bracket(problem, state, pivots, _count_ge(problem, pivots))
  # Groups without finite coordinates finish at once: τ = +inf, nothing is clipped.
  state = _finish(state, empty, jnp.full((G,), bits.inf_key, bits.key_dtype))

  def top_k_step(s):
    r = problem.k - s.c_hi
    answer = _top_below(problem, s.hi, r)
    return _finish(s, s.active & (r <= _TOP_K), answer)._replace(step=s.step + 1)

  def snap_step(s):
    # The bracket's largest element is the answer when r == 1, its smallest when r == width,
    # and either when they are equal; otherwise the bracket shrinks to [smallest, largest].
    largest, smallest = _snap(problem, s.lo, s.hi)
    r = problem.k - s.c_hi
    width = s.c_lo - s.c_hi
    solved = s.active & ((r == 1) | (r == width) | (largest == smallest))
    answer = jnp.where(r == width, smallest, largest)
    snapped = s._replace(lo=jnp.where(s.active, smallest, s.lo),
                         hi=jnp.where(s.active, largest + 1, s.hi))
    return _finish(snapped, solved, answer)._replace(
        just_snapped=jnp.ones((), bool), step=s.step + 1)

  def count_step(s):
    pivots = _interpolated_pivots(problem, s)
    s = _update_bracket(problem, s, pivots, _count_ge(problem, pivots))
    return s._replace(step=s.step + 1)

  def body(s):
    r = problem.k - s.c_hi
    width = s.c_lo - s.c_hi
    wants_snap = s.active & ~s.just_snapped & ((r == 1) | (r == width) | (width <= 4))
    snap_or_count = lambda s: jax.lax.cond(jnp.any(wants_snap), snap_step, count_step, s)
    # No top_k on a device's blocks, nor on the NaN/Inf path (its |g| would need a stored
    # select, see _count_ge).
    if not (problem.gather_ok and problem.finite_only):
      return snap_or_count(s)
    # The two-level top_k finishes every group whose answer is among the _TOP_K largest
    # elements below hi (and is a normal number, see _top_below; lo >= 2^-102 implies both
    # that and exact float comparisons).
    ready = ~s.active | ((r <= _TOP_K) & (s.lo >= bits.min_fast_key))
    return jax.lax.cond(jnp.all(ready), top_k_step, snap_or_count, s)

  def cond(s):
    return jnp.any(s.active) & (s.step < _MAX_STEPS)

  return jax.lax.while_loop(cond, body, state).lo


def _top_count(fraction, n, static_n: int | None):
  """k = ceil(fraction · n), at least 1 (0 when n == 0).

  For a Python-number fraction and a static n this is numpy's float64 arithmetic,
  `ceil(fraction * n)`. Otherwise (a traced fraction, or n counted on device because some
  coordinates are not finite) it is the ceiling of the exact product of the float32 fraction
  and n, computed with Dekker's error-free product for n < 2^24.
  """
  if static_n is not None and not isinstance(fraction, jax.core.Tracer) and \
      not isinstance(fraction, jax.Array):
    k = min(static_n, max(1, math.ceil(float(np.float64(fraction) * static_n))))
    return jnp.asarray(k if static_n else 0, jnp.int32)
  f = jnp.asarray(fraction, jnp.float32)
  x = jnp.asarray(n).astype(jnp.float32)
  p = f * x
  # Dekker split of both factors into 12-bit halves; the partial products are exact.
  split = jnp.float32(4097.0)
  def halves(v):
    c = split * v
    high = c - (c - v)
    return high, v - high
  f_hi, f_lo = halves(f)
  x_hi, x_lo = halves(x)
  err = ((f_hi * x_hi - p) + f_hi * x_lo + f_lo * x_hi) + f_lo * x_lo
  ceil_p = jnp.ceil(p)
  k = jnp.where(ceil_p == p, jnp.where(err > 0, p + 1, p), ceil_p)
  k = jnp.clip(k, 1, x).astype(jnp.int32)
  return jnp.where(jnp.asarray(n) > 0, k, 0)


def _is_sharded(x) -> bool:
  return explicit_spec(x) is not None


def _gather_ok(float_leaves, across: _Across) -> bool:
  """Whether the search may sample and top_k the leaves: not for a device's blocks."""
  return not across.axes and not any(_is_sharded(l) for l in float_leaves)


def _problem(float_leaves, fraction, per_leaf: bool, finite_only: bool,
             across: _Across = _UNSHARDED) -> _Problem:
  bits = _bits_for([l.dtype for l in float_leaves])
  num_groups = len(float_leaves) if per_leaf else 1
  group_of_leaf = list(range(len(float_leaves))) if per_leaf else [0] * len(float_leaves)
  sizes = across.global_sizes(float_leaves)
  if max([sum(sizes)] + sizes) >= 2 ** 31 - 1:
    raise ValueError("clip_threshold: trees with 2^31 or more coordinates are not supported")
  problem = _Problem(list(float_leaves), group_of_leaf, num_groups, None, None, bits,
                     _gather_ok(float_leaves, across), finite_only, across)
  if finite_only:
    group_n = [0] * num_groups
    for size, group in zip(sizes, group_of_leaf):
      group_n[group] += size
    k = jnp.stack([_top_count(fraction, n, n) for n in group_n]) if group_n else \
        jnp.zeros((0,), jnp.int32)
    n = jnp.asarray(group_n, jnp.int32)
  else:
    count = lambda chunk: jnp.sum(jnp.isfinite(chunk), dtype=jnp.int32)[None]
    n = _group_combine([_reduce_in_chunks(l, count, jnp.add) for l in float_leaves],
                       problem, jnp.add, 0)[:, 0]
    k = jnp.stack([_top_count(fraction, n[g], None) for g in range(num_groups)])
  return problem._replace(k=k, n=n)


def _compact_select(float_leaves, fraction, per_leaf: bool, bits: _Bits,
                    across: _Across = _UNSHARDED) -> jax.Array:
  """Plain 16-ary search over the keys for small trees: exact, and cheap to compile.

  Finds, per group, the largest key v with count(v <= key < inf) >= k in 8 passes over
  [0, inf_key), each counting 15 pivots per leaf. Non-finite entries never count, so there is
  no separate finite/non-finite branch to compile.
  """
  num_groups = len(float_leaves) if per_leaf else 1
  group_of_leaf = list(range(len(float_leaves))) if per_leaf else [0] * len(float_leaves)
  inf_key = jnp.asarray(bits.inf_key, bits.key_dtype)

  def group_sums(per_leaf_values):  # one all-reduce across devices per call
    sums = [jnp.zeros(jnp.shape(per_leaf_values[0]), jnp.int32) for _ in range(num_groups)]
    for value, group in zip(across.weighted(per_leaf_values), group_of_leaf):
      sums[group] = sums[group] + value
    return across.sum(jnp.stack(sums))

  n_finite = group_sums([jnp.sum(jnp.isfinite(l), dtype=jnp.int32) for l in float_leaves])
  static_n = [0] * num_groups
  for size, group in zip(across.global_sizes(float_leaves), group_of_leaf):
    static_n[group] += size
  all_finite = n_finite == jnp.asarray(static_n, jnp.int32)
  k_static = jnp.stack([_top_count(fraction, n, n) for n in static_n])
  k_counted = jnp.stack([_top_count(fraction, n_finite[g], None) for g in range(num_groups)])
  k = jnp.where(all_finite, k_static, k_counted)

  # 16-ary search: each pass counts 15 evenly spaced pivots, shrinking [lo, hi) 16-fold, so
  # 8 passes cover the 2^31 keys (fewer, larger passes: on small trees the per-pass overhead
  # is the cost, and under sharding each pass is one small all-reduce).
  fractions = jnp.arange(1, 16, dtype=bits.key_dtype)

  def narrow(_, bracket):
    lo, hi = bracket
    width = hi - lo
    # lo + floor(width·j/16) without int32 overflow
    pivots = (lo[:, None] + (width[:, None] >> 4) * fractions[None]
              + (((width[:, None] & 15) * fractions[None]) >> 4))  # (G, 15)
    # In chunks (see `_reduce_in_chunks`), keys taken per chunk: on whole leaves XLA stored
    # the (size, 15) compares, 58 MiB and 155 ms at 1M coordinates.
    def count(chunk, g):
      key = _value_to_key(jnp.abs(chunk).astype(bits.float_dtype), bits)  # NaN: > inf_key
      return jnp.sum((key[None] >= pivots[g][:, None]) & (key[None] < inf_key), axis=1,
                     dtype=jnp.int32)
    counts = group_sums([_reduce_in_chunks(leaf, functools.partial(count, g=g), jnp.add)
                         for leaf, g in zip(float_leaves, group_of_leaf)])
    enough = counts >= k[:, None]
    new_lo = jnp.max(jnp.where(enough, pivots, lo[:, None]), axis=1)
    new_hi = jnp.min(jnp.where(enough, hi[:, None], pivots), axis=1)
    return new_lo, new_hi

  lo = jnp.zeros((num_groups,), bits.key_dtype)
  hi = jnp.full((num_groups,), bits.inf_key, bits.key_dtype)
  lo, _ = jax.lax.fori_loop(0, 8, narrow, (lo, hi))
  return _key_to_value(jnp.where(n_finite > 0, lo, inf_key), bits)


# Trees up to this many coordinates use `_compact_select`, which compiles in about a second;
# the sample-and-interpolate search takes 5-15 s to compile but runs faster on larger trees
# (2 cores: about even at 200K coordinates, 8-12 vs 11 ms; 51 vs 16 ms at 1M). Larger
# (float32/bfloat16/float16) trees take the search.
_COMPACT_MAX_SIZE = 1 << 18


def _threshold_keys(float_leaves, fraction, per_leaf: bool, across: _Across = _UNSHARDED):
  """Per-group thresholds as values of the key float dtype."""
  if not across.axes and any(_is_sharded(l) for l in float_leaves):
    return _sharded_threshold_keys(float_leaves, fraction, per_leaf)
  bits = _bits_for([l.dtype for l in float_leaves])
  total = sum(across.global_sizes(float_leaves))
  if bits.float_dtype == jnp.float32 and total <= _COMPACT_MAX_SIZE:
    return _compact_select(float_leaves, fraction, per_leaf, bits, across)
  # sum(g * 0) is 0 exactly when every entry is finite: a cheap vectorised check that picks
  # the fast path (static n) over the path that counts and masks non-finite entries.
  all_finite = jnp.isfinite(across.sum(
      sum(jnp.sum(l.astype(bits.float_dtype) * 0) for l in float_leaves)))
  fast = lambda: _select(_problem(float_leaves, fraction, per_leaf, True, across))
  slow = lambda: _select(_problem(float_leaves, fraction, per_leaf, False, across))
  keys = jax.lax.cond(all_finite, fast, slow)
  return _key_to_value(keys, bits)


def _sharded_threshold_keys(float_leaves, fraction, per_leaf: bool):
  """`_threshold_keys` for explicitly sharded leaves, in a `shard_map` over their mesh.

  Every device searches on its own blocks; each pass combines the per-leaf partial counts
  (or extremes) locally and then all-reduces one small (groups, pivots) table, so the
  communication per pass is a few scalars whatever the model size.
  """
  sharding = next(jax.typeof(l).sharding for l in float_leaves if _is_sharded(l))
  mesh = sharding.mesh
  axes = tuple(mesh.axis_names)
  specs = tuple(explicit_spec(l) or jax.sharding.PartitionSpec() for l in float_leaves)
  sizes = tuple(int(l.size) for l in float_leaves)
  fraction_is_array = isinstance(fraction, (jax.Array, jax.core.Tracer))

  def used_axes(spec):
    names = set()
    for entry in spec:
      names.update(entry if isinstance(entry, tuple) else (entry,))
    return names

  def local(fraction_value, *blocks):
    weights = []
    for spec in specs:
      first = jnp.ones((), jnp.int32)
      for axis in axes:
        if axis not in used_axes(spec):  # replicated along axis: count one copy only
          first = first * (jax.lax.axis_index(axis) == 0).astype(jnp.int32)
      weights.append(first)
    across = _Across(axes, tuple(weights), sizes)
    value = fraction_value if fraction_is_array else fraction
    return _threshold_keys(list(blocks), value, per_leaf, across)

  fraction_arg = jnp.asarray(fraction) if fraction_is_array else jnp.zeros(())
  return jax.shard_map(local, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),) + specs,
                       out_specs=jax.sharding.PartitionSpec(), check_vma=False)(
                           fraction_arg, *float_leaves)


def _output_dtype(float_leaves):
  return jnp.result_type(*[l.dtype for l in float_leaves])


def clip_threshold(tree: Any, fraction: float | jax.Array, *, per_leaf: bool = False) -> Any:
  """The coordinate-wise clipping threshold τ of a pytree.

  τ is the k-th largest |g| over the finite coordinates of the floating-point leaves, with
  k = ⌈fraction · n_finite⌉ (at least 1). It equals
  ``np.sort(np.abs(finite_values))[::-1][k - 1]`` bit for bit. Non-floating leaves (ints,
  bools) and ``None`` leaves are ignored. A tree without finite coordinates has τ = +inf.

  The computation selects on the float bit pattern with per-leaf reductions; it neither
  concatenates the leaves nor sorts the coordinates (see the module docstring).

  Args:
    tree: a pytree of arrays (gradients, updates, ...).
    fraction: the fraction of coordinates at or above τ, in (0, 1]. May be traced.
    per_leaf: if True, compute one threshold per floating-point leaf.

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
  validate_fraction(fraction, "fraction")
  leaves, treedef = jax.tree.flatten(tree)
  float_positions = [i for i, l in enumerate(leaves) if _is_float_leaf(l)]
  float_leaves = [jnp.asarray(leaves[i]) for i in float_positions]
  if not float_leaves:
    if per_leaf:
      return jax.tree.unflatten(treedef, [None] * len(leaves))
    return jnp.asarray(jnp.inf, jnp.float32)
  values = _threshold_keys(float_leaves, fraction, per_leaf)
  if not per_leaf:
    return values[0].astype(_output_dtype(float_leaves))
  out = [None] * len(leaves)
  for group, i in enumerate(float_positions):
    out[i] = values[group].astype(float_leaves[group].dtype)
  return jax.tree.unflatten(treedef, out)


def _threshold_for_dtype(threshold, dtype):
  """Casts τ to a leaf dtype, rounding toward zero so that |ĝ| <= τ still holds."""
  cast = jnp.asarray(threshold).astype(dtype)
  too_big = cast.astype(jnp.float32) > jnp.asarray(threshold).astype(jnp.float32)
  return jnp.where(too_big, jnp.nextafter(cast, jnp.zeros((), dtype)), cast)


def clip_to_threshold(tree: Any, threshold: Any) -> Any:
  """ĝ_i = sgn(g_i) · min(|g_i|, τ) on floating leaves; other leaves and non-finite entries pass.

  Args:
    tree: a pytree of arrays.
    threshold: a scalar τ, or a pytree of scalars matching ``tree`` (as returned by
      ``clip_threshold(..., per_leaf=True)``).
  """
  def clip_leaf(g, tau):
    if not _is_float_leaf(g):
      return g
    tau = _threshold_for_dtype(tau, g.dtype)
    return jnp.where(jnp.isfinite(g), jnp.clip(g, -tau, tau), g)

  if isinstance(threshold, (jax.Array, np.ndarray, numbers.Real)):
    return jax.tree.map(lambda g: clip_leaf(g, threshold), tree)
  return jax.tree.map(lambda g, t: clip_leaf(g, t) if t is not None else g, tree, threshold,
                      is_leaf=lambda x: x is None)


class CoordClipState(NamedTuple):
  """State of `coord_clip`: the threshold used at the last step (for logging)."""
  threshold: Any


def _initial_threshold(params, per_leaf: bool):
  leaves = [l for l in jax.tree.leaves(params) if _is_float_leaf(l)]
  dtype = _bits_for([l.dtype for l in leaves]).float_dtype if leaves else jnp.float32
  if not per_leaf:
    return jnp.asarray(jnp.inf, dtype)
  return jax.tree.map(
      lambda p: jnp.asarray(jnp.inf, dtype) if _is_float_leaf(p) else None, params)


def coord_clip(fraction: float | jax.Array, *, per_leaf: bool = False
               ) -> optax.GradientTransformation:
  """Clips every coordinate to the magnitude of the top-``fraction`` coordinates.

  Update rule, with τ = `clip_threshold(g, fraction, per_leaf=per_leaf)`:

    ĝ_i = sgn(g_i) · min(|g_i|, τ)

  so the ⌈fraction · n⌉ largest coordinates (and their ties) are set to ±τ and the rest pass
  unchanged. NaN/Inf coordinates are excluded from τ and pass through, so
  `optax.apply_if_finite` still sees them. Non-floating and ``None`` leaves pass through; every
  leaf keeps its dtype. Works under `jit`, `optax.inject_hyperparams` (a traced ``fraction``),
  `optax.masked` and `optax.MultiSteps`.

  Args:
    fraction: fraction of coordinates to clip, in (0, 1]; ``fraction=1`` clips everything to
      the smallest |g|.
    per_leaf: one threshold per leaf instead of one over all parameters.

  Returns:
    An `optax.GradientTransformation`; its state records the last threshold.

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
  validate_fraction(fraction, "fraction")

  def init_fn(params):
    return CoordClipState(threshold=_initial_threshold(params, per_leaf))

  def update_fn(updates, state, params=None):
    del params
    threshold = clip_threshold(updates, fraction, per_leaf=per_leaf)
    clipped = clip_to_threshold(updates, threshold)
    if per_leaf:
      recorded = jax.tree.map(
          lambda t, old: jnp.asarray(t, old.dtype), threshold, state.threshold)
    else:
      recorded = jnp.asarray(threshold, state.threshold.dtype)
    return clipped, CoordClipState(threshold=recorded)

  return optax.GradientTransformation(init_fn, update_fn)
