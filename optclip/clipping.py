"""Coordinate-wise clipping to the top-k% magnitude (Pan & Li 2023, Section 4.1).

The clipped gradient is ĝ_i = sgn(g_i) · min(|g_i|, τ), where τ is the k-th largest |g_i| over
all finite coordinates of all floating-point leaves, k = ⌈fraction · n⌉.

Finding τ exactly is a selection problem. Concatenating the leaves and sorting (what
`jnp.quantile` does) costs seconds at 10M coordinates, so this module selects on the float bit
pattern instead: for non-negative IEEE floats, the order of the values is the order of their
bits read as integers ("keys"). A bracket [lo, hi) of keys with count(|g| ≥ lo) ≥ k >
count(|g| ≥ hi) is narrowed until it holds one key. Each narrowing step is one pass over the
data: per leaf, one variadic `lax.reduce` that counts the keys at or above 8 pivots and finds
the bracket's largest and smallest element (never a gather or a sort of the data). The first
pivots come from a small strided sample, later ones from interpolating the exact counts, with
key-space splitting when a pass stalls; at 10M coordinates a search takes 3-7 passes. Small
trees (at most 2^18 coordinates) are concatenated first, which only saves compile time. On
sharded leaves the search runs in a `shard_map`: per-device partial counts are combined
across leaves and all-reduced once per pass, a few scalars.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from __future__ import annotations

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

# Pivots counted per pass over the data. A pass is one variadic reduction per leaf, and XLA on
# CPU runs a reduction of several operands as one vectorised loop: 8 integer compares plus the
# extremes cost about as much as reading |g| once (6 ms at 10M coordinates on 2 cores), while a
# single-operand integer reduction is not vectorised (28 ms) and a stacked (P, ...) reduction
# reads the data once per pivot.
_PIVOTS = 8
# Target size of the strided sample that seeds the first pass. Its sort is the only sort in the
# selection; 16K elements sort in a few milliseconds on a CPU core.
_SAMPLE_SIZE = 16384
# Sample ranks of the first pivots, in standard deviations of the sample quantile around k.
_SAMPLE_Z = (-4.0, -2.0, -1.0, -0.3, 0.3, 1.0, 2.0, 4.0)
# Later pivots: count targets k + spread · these (see _next_pivots), with
# spread = width · _SPREAD_LINEAR + sqrt(width) · _SPREAD_NOISE + 1.
_INTERP_Z = (-3.0, -1.0, -0.4, -0.1, 0.1, 0.4, 1.0, 3.0)
_SPREAD_LINEAR = 1 / 256
_SPREAD_NOISE = 1.0
# A safety net only. A pass either halves the bracket's width (at most 31 times) or stalls and
# is followed by a key-space split into 9 parts (at most 10 in float32, 20 in float64).
_MAX_PASSES = 100


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
  inf_key: int  # key of +inf; finite |g| lie below it, NaN above


def _bits_for(dtypes: Sequence[Any]) -> _Bits:
  # bfloat16 and float16 widen to float32 exactly, so float32 keys order all of them; float64
  # (with jax_enable_x64) needs 64-bit keys.
  if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
    return _Bits(jnp.float64, jnp.int64, 0x7FF0000000000000)
  return _Bits(jnp.float32, jnp.int32, 0x7F800000)


def _key_to_value(key, bits: _Bits):
  return jax.lax.bitcast_convert_type(key.astype(bits.key_dtype), bits.float_dtype)


def _value_to_key(value, bits: _Bits):
  return jax.lax.bitcast_convert_type(value.astype(bits.float_dtype), bits.key_dtype)


class _Across(NamedTuple):
  """How per-device partial results combine into global ones.

  Unsharded: no axes, nothing to do. Inside the `shard_map` of `_sharded_threshold_keys`,
  every leaf is this device's block: sums are masked to one copy of each block (``weights``:
  1 on the first device along every mesh axis the leaf is replicated over, else 0) and then
  summed over all mesh axes; maxima need no mask. Each pass of a search all-reduces a few
  scalars: one sum (the counts) and one max (the extremes).
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
  leaves: list  # the floating leaves as given; |g| and its key are taken inside every pass
  group_of_leaf: list  # static group index per leaf
  num_groups: int
  sizes: jax.Array  # (G,) int32 coordinates per group (global ones under sharding)
  k_static: jax.Array  # (G,) int32 k when every coordinate is finite
  fraction: Any
  bits: _Bits
  gather_ok: bool  # False for sharded leaves: no sample gather, only reductions
  across: _Across = _UNSHARDED

  def k_for(self, n):
    """k = ceil(fraction · n) for the finite counts n (the static k when all are finite)."""
    return jnp.where(n == self.sizes, self.k_static, _top_count(self.fraction, n, None))


def _group_combine(per_leaf: list, problem: _Problem, combine, fill):
  """Combines per-leaf arrays of shape (P,) into per-group arrays of shape (G, P).

  ``combine`` is jnp.add or jnp.maximum; across devices (see `_Across`) the table is then
  summed or maximised in one collective.
  """
  if combine is jnp.add:
    per_leaf = problem.across.weighted(per_leaf)
  rows = [None] * problem.num_groups
  for value, group in zip(per_leaf, problem.group_of_leaf):
    rows[group] = value if rows[group] is None else combine(rows[group], value)
  width = per_leaf[0].shape[0] if per_leaf else 1
  table = jnp.stack([r if r is not None else jnp.full((width,), fill) for r in rows])
  return problem.across.sum(table) if combine is jnp.add else problem.across.max(table)


def _keys(bits: _Bits, raw):
  """Keys of |g|: NaN above inf_key, ±inf at it, finite values below."""
  return _value_to_key(jnp.abs(raw), bits)


def _count_pass(problem: _Problem, pivots, lo, hi):
  """One pass over the data, per group: counts of |g| >= each pivot among the finite entries,
  the number of non-finite entries, the largest key below hi and the smallest finite key at
  or above lo. Shapes: pivots (G, P), lo and hi (G,) -> (G, P), (G,), (G,), (G,).

  Exact integer comparisons on the keys (subnormals, zeros and NaN need no special case).
  Every leaf is one `lax.reduce` over P + 3 operands; XLA fuses the compares into it, so no
  full-size intermediate is stored.
  """
  bits = problem.bits
  num_pivots = pivots.shape[1]
  inf_key = jnp.asarray(bits.inf_key, bits.key_dtype)

  def add_max_min(x, y):
    sums = tuple(a + b for a, b in zip(x[:num_pivots + 1], y[:num_pivots + 1]))
    return sums + (jnp.maximum(x[-2], y[-2]), jnp.minimum(x[-1], y[-1]))

  init = ((jnp.zeros((), jnp.int32),) * (num_pivots + 1)
          + (jnp.zeros((), bits.key_dtype), inf_key))
  counts, extremes = [], []
  for raw, group in zip(problem.leaves, problem.group_of_leaf):
    key = _keys(bits, raw)
    finite = key < inf_key
    operands = tuple((key >= pivots[group, p]).astype(jnp.int32) for p in range(num_pivots))
    operands += ((~finite).astype(jnp.int32), jnp.where(key < hi[group], key, 0),
                 jnp.where(finite & (key >= lo[group]), key, inf_key))
    out = jax.lax.reduce(operands, init, add_max_min, tuple(range(key.ndim)))
    counts.append(jnp.stack(out[:num_pivots + 1]))
    extremes.append(jnp.stack([out[-2], -out[-1]]))  # both maximised: largest, -smallest
  counts = _group_combine(counts, problem, jnp.add, 0)
  extremes = _group_combine(extremes, problem, jnp.maximum, -inf_key)
  non_finite = counts[:, -1]
  return counts[:, :-1] - non_finite[:, None], non_finite, extremes[:, 0], -extremes[:, 1]


def _moment_pivots(problem: _Problem, q):
  """First pivots without a sample (sharded leaves): multiples of the mean |g| per group.

  Gathering a sample across devices would cost more communication than the whole search;
  the mean needs one scalar all-reduce. Later passes interpolate from the exact counts.
  """
  bits = problem.bits
  sums = _group_combine(
      [jnp.sum(jnp.where(jnp.isfinite(l), jnp.abs(l), 0).astype(jnp.float32))[None]
       for l in problem.leaves], problem, jnp.add, 0)
  mean = sums[:, 0] / jnp.maximum(problem.sizes, 1)
  # Heavier tails and smaller q push the k-th largest above the mean.
  centre = mean * (1 - jnp.log(jnp.clip(q, 1e-7, 1.0)))
  multipliers = jnp.asarray(np.geomspace(1 / 16, 16, _PIVOTS), jnp.float32)
  return _value_to_key((centre[:, None] * multipliers[None]).astype(bits.float_dtype), bits)


def _first_pivots(problem: _Problem):
  """Pivots per group bracketing the k-th largest of a strided sample of each group."""
  bits = problem.bits
  q = problem.k_static.astype(jnp.float32) / jnp.maximum(problem.sizes, 1)
  if not problem.gather_ok:
    return _moment_pivots(problem, q)
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
    key = _keys(bits, jnp.ravel(sample))
    members[group].append(jnp.where(key < bits.inf_key, key, 0))  # non-finite: least
  pivots = []
  for group in range(problem.num_groups):
    if not members[group]:
      pivots.append(jnp.zeros((_PIVOTS,), bits.key_dtype))
      continue
    sample = jnp.sort(jnp.concatenate(members[group]))[::-1]
    size = sample.shape[0]
    sigma = jnp.sqrt(size * q[group] * (1 - q[group])) + 1
    ranks = q[group] * size + jnp.asarray(_SAMPLE_Z) * sigma
    pivots.append(sample[jnp.clip(jnp.round(ranks).astype(jnp.int32), 0, size - 1)])
  return jnp.stack(pivots)


class _SearchState(NamedTuple):
  lo: jax.Array  # (G,) keys with count(|g| >= lo) = c_lo >= k
  hi: jax.Array  # (G,) keys with count(|g| >= hi) = c_hi < k
  c_lo: jax.Array
  c_hi: jax.Array
  k: jax.Array  # (G,) fixed by the first pass, which counts the finite coordinates
  pivots: jax.Array  # (G, P) keys for the next pass
  width_before: jax.Array  # (G,) c_lo - c_hi before the last pass
  step: jax.Array

  @property
  def active(self):
    return (self.hi - self.lo) > 1


def _solve(s: _SearchState, solved, answer) -> _SearchState:
  return s._replace(lo=jnp.where(solved, answer, s.lo), hi=jnp.where(solved, answer + 1, s.hi))


def _narrow(s: _SearchState, counts, largest, smallest) -> _SearchState:
  """The bracket after a pass: lo up to the highest pivot with count >= k, hi down to the
  lowest with count < k, then both onto the extremes of the old bracket's elements."""
  active = s.active
  k = s.k[:, None]
  key_dtype = s.lo.dtype
  ge = counts >= k
  from_lo = jnp.max(jnp.where(ge, s.pivots, s.lo[:, None]), axis=1)
  from_hi = jnp.min(jnp.where(ge, s.hi[:, None], s.pivots), axis=1)
  c_lo = jnp.max(jnp.where(ge & (s.pivots == from_lo[:, None]), counts, -1), axis=1)
  c_hi = jnp.max(jnp.where(~ge & (s.pivots == from_hi[:, None]), counts, -1), axis=1)
  c_lo = jnp.where(from_lo > s.lo, c_lo, s.c_lo)
  c_hi = jnp.where(from_hi < s.hi, c_hi, s.c_hi)
  # No element of the old bracket lies in [old lo, smallest) or in (largest, old hi), so
  # moving the ends there keeps both counts.
  lo = jnp.maximum(from_lo, smallest)
  hi = jnp.minimum(from_hi, (largest + 1).astype(key_dtype))
  new = s._replace(lo=jnp.where(active, lo, s.lo), hi=jnp.where(active, hi, s.hi),
                   c_lo=jnp.where(active, c_lo, s.c_lo), c_hi=jnp.where(active, c_hi, s.c_hi),
                   width_before=jnp.where(active, s.c_lo - s.c_hi, s.width_before))
  # The answer is the bracket's largest element when r == 1, its smallest when r == width.
  r = new.k - new.c_hi
  top = active & (r == 1) & (new.hi == largest + 1)
  bottom = active & (r == new.c_lo - new.c_hi) & (new.lo == smallest)
  return _solve(new, top | bottom, jnp.where(top, largest, smallest))


def _next_pivots(problem: _Problem, s: _SearchState):
  """Pivots where the counts, linearly interpolated in value, cross k ± a spread.

  Inside a narrow bracket the count is close to linear in the value; the error is a small
  fraction of the bracket plus the counting noise of its elements, ~sqrt(width). Key-space
  splitting bounds the worst case: when the last pass did not halve the bracket, without a
  finite upper bound, and when few keys are left.
  """
  bits = problem.bits
  k = s.k.astype(jnp.float32)
  width = jnp.maximum(s.c_lo - s.c_hi, 1).astype(jnp.float32)
  spread = width * _SPREAD_LINEAR + _SPREAD_NOISE * jnp.sqrt(width) + 1
  targets = k[:, None] + spread[:, None] * jnp.asarray(_INTERP_Z, jnp.float32)[None]
  fractions = jnp.clip((s.c_lo[:, None] - targets) / width[:, None], 0.0, 1.0)
  lo_value = _key_to_value(s.lo, bits)
  hi_value = _key_to_value(s.hi, bits)
  values = lo_value[:, None] + (hi_value - lo_value)[:, None] * fractions.astype(
      bits.float_dtype)
  interpolated = _value_to_key(values, bits)
  span = s.hi - s.lo
  parts = _PIVOTS + 1
  j = jnp.arange(1, parts, dtype=span.dtype)[None]
  # lo + floor(span · j / parts) without overflow
  split = s.lo[:, None] + (span // parts)[:, None] * j + ((span % parts)[:, None] * j) // parts
  stalled = (s.c_lo - s.c_hi) * 2 > s.width_before
  use_split = stalled | ~jnp.isfinite(hi_value) | (span <= 4 * parts)
  pivots = jnp.where(use_split[:, None], split, interpolated)
  return jnp.clip(pivots, (s.lo + 1)[:, None], (s.hi - 1)[:, None])


def _search(problem: _Problem) -> _SearchState:
  """The final search state: lo is the key of the k-th largest finite |g| per group (the inf
  key for groups without one), step the number of passes.

  Each loop iteration is one `_count_pass`. The first also counts the finite entries (and so
  fixes k); groups without any finish at once.
  """
  bits = problem.bits
  G = problem.num_groups
  inf_key = jnp.asarray(bits.inf_key, bits.key_dtype)
  state = _SearchState(
      lo=jnp.zeros((G,), bits.key_dtype), hi=jnp.full((G,), inf_key), c_lo=problem.sizes,
      c_hi=jnp.zeros((G,), jnp.int32), k=problem.k_static,
      pivots=jnp.clip(_first_pivots(problem), 1, inf_key - 1), width_before=problem.sizes,
      step=jnp.zeros((), jnp.int32))

  def body(s):
    # Tied to the loop counter, the leaves are not loop-invariant: XLA would otherwise hoist
    # their keys out of the loop and store them, a full-size copy of every leaf.
    leaves, _ = jax.lax.optimization_barrier((problem.leaves, s.step))
    counts, non_finite, largest, smallest = _count_pass(
        problem._replace(leaves=leaves), s.pivots, s.lo, s.hi)
    # Every pass counts the same finite coordinates; the first starts the bracket with them.
    n = problem.sizes - non_finite
    s = s._replace(k=problem.k_for(n), c_lo=jnp.where(s.step == 0, n, s.c_lo))
    s = _solve(s, n == 0, inf_key)  # no finite coordinate: τ = +inf
    s = _narrow(s, counts, largest, smallest)
    return s._replace(pivots=_next_pivots(problem, s), step=s.step + 1)

  def cond(s):
    return (s.step == 0) | (jnp.any(s.active) & (s.step < _MAX_PASSES))

  return jax.lax.while_loop(cond, body, state)


def _float64_top_count(fraction: float, n):
  """ceil(fraction · n) exactly as numpy's float64 computes it, for a Python float fraction in
  (0, 1] and int32 counts n on device (no float64 needed, so also without jax_enable_x64).

  fraction = M · 2^-L with an integer M < 2^53, so p = fraction · n = P · 2^-L with the integer
  P = M · n < 2^84, formed exactly in 16-bit limbs. With m = floor(p) and R = P mod 2^L,
  float64 rounds p down to m when p - m is at most half an ulp of p, 2^(e - 53) for
  e = floor(log2 m) (a tie goes to m, whose last significand bit is 0): then the ceiling is
  m, otherwise m + 1. That is k = m + [R > 2^T] with T = L + e - 53.
  """
  mantissa, exponent = math.frexp(fraction)  # fraction = mantissa · 2^exponent
  M, L = int(mantissa * 2 ** 53), 53 - exponent
  n = jnp.asarray(n).astype(jnp.uint32)
  a = [jnp.uint32((M >> (16 * i)) & 0xFFFF) for i in range(4)]
  b = [n & 0xFFFF, n >> 16]
  columns = [jnp.zeros_like(n) for _ in range(7)]
  for i in range(4):
    for j in range(2):
      product = a[i] * b[j]  # < 2^32
      columns[i + j] = columns[i + j] + (product & 0xFFFF)
      columns[i + j + 1] = columns[i + j + 1] + (product >> 16)
  limbs, carry = [], jnp.zeros_like(n)
  for column in columns:  # P in 16-bit limbs, least significant first
    total = column + carry
    limbs.append(total & 0xFFFF)
    carry = total >> 16
  width = 16 * len(limbs)

  def bits_at_least(position):  # P >> position for a static position (the low 32 bits)
    out = jnp.zeros_like(n)
    for index, limb in enumerate(limbs):
      shift = 16 * index - position
      if -16 < shift < 32:
        out = out | (limb << shift if shift >= 0 else limb >> -shift)
    return out

  def any_bits(start, stop):  # whether P has a set bit in [start, stop)
    found = jnp.zeros(n.shape, bool)
    for index, limb in enumerate(limbs):
      low = jnp.clip(start - 16 * index, 0, 16).astype(jnp.uint32)
      high = jnp.clip(stop - 16 * index, 0, 16).astype(jnp.uint32)
      mask = ((jnp.uint32(1) << high) - 1) & ~((jnp.uint32(1) << low) - 1)
      found = found | ((limb & mask) != 0)
    return found

  if L >= width:  # p < 1: float64 rounds it to a positive number below 1 at most
    m = jnp.zeros_like(n)
  else:
    m = bits_at_least(L)
  e = 31 - jax.lax.clz(jnp.maximum(m, 1)).astype(jnp.int32)
  threshold_bit = L + e - 53
  bit_set = any_bits(threshold_bit, threshold_bit + 1)
  above = any_bits(threshold_bit + 1, min(L, width)) | (
      bit_set & any_bits(jnp.zeros_like(threshold_bit), threshold_bit))
  k = jnp.where(m == 0, 1, m + above.astype(jnp.uint32))
  n = n.astype(jnp.int32)
  return jnp.where(n > 0, jnp.clip(k.astype(jnp.int32), 1, n), 0)


def _top_count(fraction, n, static_n: int | None):
  """k = ceil(fraction · n), at least 1 (0 when n == 0).

  For a Python-number fraction this is numpy's float64 arithmetic, `ceil(fraction * n)`,
  on the host for a static n and in `_float64_top_count` for n counted on device (when some
  coordinates are not finite). For a traced fraction it is the ceiling of the exact product
  of the float32 fraction and n, computed with Dekker's error-free product for n < 2^24.
  """
  if not isinstance(fraction, (jax.core.Tracer, jax.Array)):
    if static_n is None:
      return _float64_top_count(float(fraction), n)
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
  """Whether the search may sample the leaves: not a device's blocks (see _moment_pivots)."""
  return not across.axes and not any(_is_sharded(l) for l in float_leaves)


def _problem(float_leaves, fraction, per_leaf: bool, across: _Across = _UNSHARDED) -> _Problem:
  bits = _bits_for([l.dtype for l in float_leaves])
  num_groups = len(float_leaves) if per_leaf else 1
  group_of_leaf = list(range(len(float_leaves))) if per_leaf else [0] * len(float_leaves)
  sizes = across.global_sizes(float_leaves)
  if max([sum(sizes)] + sizes) >= 2 ** 31 - 1:
    raise ValueError("clip_threshold: trees with 2^31 or more coordinates are not supported")
  group_n = [0] * num_groups
  for size, group in zip(sizes, group_of_leaf):
    group_n[group] += size
  k_static = jnp.stack([_top_count(fraction, n, n) for n in group_n])
  return _Problem(list(float_leaves), group_of_leaf, num_groups, jnp.asarray(group_n, jnp.int32),
                  k_static, fraction, bits, _gather_ok(float_leaves, across), across)


# Unsharded trees of at most this many coordinates are concatenated before a global search
# (a copy of at most 1 MiB): every pass is then one reduce instead of one per leaf, and XLA
# compiles the search several times faster (about 35 ms per leaf's reduce on 2 cores).
_PACK_MAX_SIZE = 1 << 18


def _threshold_keys(float_leaves, fraction, per_leaf: bool, across: _Across = _UNSHARDED):
  """Per-group thresholds as values of the key float dtype."""
  if not across.axes and any(_is_sharded(l) for l in float_leaves):
    return _sharded_threshold_keys(float_leaves, fraction, per_leaf)
  if (not per_leaf and not across.axes and len(float_leaves) > 1
      and sum(l.size for l in float_leaves) <= _PACK_MAX_SIZE):
    float_dtype = _bits_for([l.dtype for l in float_leaves]).float_dtype
    float_leaves = [jnp.concatenate([jnp.ravel(l).astype(float_dtype) for l in float_leaves])]
  problem = _problem(float_leaves, fraction, per_leaf, across)
  return _key_to_value(_search(problem).lo, problem.bits)


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


# Compiled once per tree structure (and static fraction), also when called eagerly: an eager
# `lax.while_loop` would otherwise be traced and compiled again at every call.
_threshold_static_fraction = jax.jit(_threshold_keys, static_argnums=(1, 2))
_threshold_traced_fraction = jax.jit(_threshold_keys, static_argnums=(2,))


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
  if isinstance(fraction, (jax.Array, jax.core.Tracer, np.ndarray)):
    values = _threshold_traced_fraction(float_leaves, fraction, per_leaf)
  else:
    values = _threshold_static_fraction(float_leaves, float(fraction), per_leaf)
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
