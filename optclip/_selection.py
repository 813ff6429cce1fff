"""Exact selection of the k-th largest |g| over the leaves of a pytree (the engine behind
`optclip.clip_threshold`).

For non-negative IEEE floats the order of the values is the order of their bits read as
integers ("keys"), so the selection runs on keys with exact integer compares (subnormals,
zeros and NaN need no special case). One entry point, `kth_largest_keys`:

1. A first pass per leaf counts the non-finite entries and finds the smallest and largest
   finite key. That fixes n (the finite count), k = `top_count(fraction, n)` and the initial
   bracket [smallest, largest + 1); k = 1 and k = n are answered at once.
2. Every later pass narrows a bracket [lo, hi) of keys with count(|g| ≥ lo) ≥ k >
   count(|g| ≥ hi): per leaf, one variadic `lax.reduce` counts the keys at or above 8 pivots
   and finds the bracket's largest and smallest element (never a gather or a sort of the
   data). The first pivots come from a small strided sample (or, without sampling, from the
   mean |g|), later ones from interpolating the exact counts, with key-space splitting when a
   pass stalls. At 10M coordinates a search takes 3-7 passes (8-10 on GPT-Neo-125M's
   shapes with leaf scales spread over 10^3).

Leaves under `PACK_BELOW` coordinates are searched as one concatenated vector per group:
every leaf costs a reduction in every pass, unrolled in the program.

Sharded leaves: the caller runs this inside a `shard_map` and passes `Across`, which sums the
per-device partial counts (and maximises the extremes) over the mesh once per pass.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


class KeyFormat(NamedTuple):
  """The float format the keys are read in."""
  float_dtype: Any
  key_dtype: Any
  inf_key: int  # key of +inf; finite |g| lie below it, NaN above


def key_format(dtypes: Sequence[Any]) -> KeyFormat:
  # bfloat16 and float16 widen to float32 exactly, so float32 keys order all of them; float64
  # (with jax_enable_x64) needs 64-bit keys.
  if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
    return KeyFormat(jnp.float64, jnp.int64, 0x7FF0000000000000)
  return KeyFormat(jnp.float32, jnp.int32, 0x7F800000)


def key_to_value(key, fmt: KeyFormat):
  return jax.lax.bitcast_convert_type(key.astype(fmt.key_dtype), fmt.float_dtype)


def _value_to_key(value, fmt: KeyFormat):
  return jax.lax.bitcast_convert_type(value.astype(fmt.float_dtype), fmt.key_dtype)


def _keys(fmt: KeyFormat, raw):
  """Keys of |g|: NaN above inf_key, ±inf at it, finite values below."""
  return _value_to_key(jnp.abs(raw), fmt)


# --- k = ceil(fraction · n) --------------------------------------------------------------------

def _fraction_limbs(fraction):
  """fraction = M · 2^-L with an integer M < 2^53: (M in four 16-bit uint32 limbs, L).

  A Python float gives its exact float64 value; a traced fraction is read as float32 (its
  value is exactly representable in float64, with M = its 24-bit significand · 2^29).
  """
  if isinstance(fraction, float):
    mantissa, exponent = math.frexp(fraction)  # fraction = mantissa · 2^exponent
    big = int(mantissa * 2 ** 53)
    return ([jnp.uint32((big >> (16 * i)) & 0xFFFF) for i in range(4)],
            jnp.int32(53 - exponent))
  bits = jax.lax.bitcast_convert_type(jnp.asarray(fraction, jnp.float32), jnp.uint32)
  biased = (bits >> 23).astype(jnp.int32)
  significand = (bits & 0x7FFFFF) | jnp.where(biased > 0, jnp.uint32(0x800000), 0)
  # value = significand · 2^(max(biased, 1) - 150) = (significand · 2^29) · 2^-L
  scale = jnp.maximum(biased, 1)
  limbs = [jnp.zeros_like(bits), (significand << 13) & 0xFFFF, (significand >> 3) & 0xFFFF,
           significand >> 19]
  return limbs, 150 - scale + 29


def top_count(fraction, n):
  """k = NumPy's ``ceil(fraction * n)`` in float64, at least 1 (0 where n == 0).

  The one rule for k, exact for every int32 count ``n`` on the device and needing no
  float64 support (so also without jax_enable_x64). ``fraction`` is a Python float (its
  float64 value) or a traced scalar (read as float32; the rule is then
  ``ceil(float64(float32(fraction)) * n)``).

  With fraction = M · 2^-L, the product p = fraction · n = P · 2^-L for the integer
  P = M · n < 2^84, formed exactly in 16-bit limbs. With m = floor(p) and R = P mod 2^L,
  float64 rounds p down to m when p - m is at most half an ulp of p, 2^(e - 53) for
  e = floor(log2 m) (a tie goes to m, whose last significand bit is 0): then the ceiling is
  m, otherwise m + 1. That is k = m + [R > 2^T] with T = L + e - 53.
  """
  limbs_m, shift = _fraction_limbs(fraction)
  n = jnp.asarray(n).astype(jnp.uint32)
  b = [n & 0xFFFF, n >> 16]
  columns = [jnp.zeros_like(n) for _ in range(7)]
  for i in range(4):
    for j in range(2):
      product = limbs_m[i] * b[j]  # < 2^32
      columns[i + j] = columns[i + j] + (product & 0xFFFF)
      columns[i + j + 1] = columns[i + j + 1] + (product >> 16)
  limbs, carry = [], jnp.zeros_like(n)
  for column in columns:  # P in 16-bit limbs, least significant first
    total = column + carry
    limbs.append(total & 0xFFFF)
    carry = total >> 16
  width = 16 * len(limbs)

  def shifted(limb, amount):  # limb · 2^amount, logical shifts of 32 or more give 0 in XLA
    left = jnp.clip(amount, 0, 32).astype(jnp.uint32)
    right = jnp.clip(-amount, 0, 32).astype(jnp.uint32)
    return jnp.where(amount >= 0, limb << left, limb >> right)

  def any_bits(start, stop):  # whether P has a set bit in [start, stop)
    found = jnp.zeros(n.shape, bool)
    for index, limb in enumerate(limbs):
      low = jnp.clip(start - 16 * index, 0, 16).astype(jnp.uint32)
      high = jnp.clip(stop - 16 * index, 0, 16).astype(jnp.uint32)
      mask = ((jnp.uint32(1) << high) - 1) & ~((jnp.uint32(1) << low) - 1)
      found = found | ((limb & mask) != 0)
    return found

  m = jnp.zeros_like(n)  # floor(p) = P >> L, its low 32 bits (p < n < 2^31)
  for index, limb in enumerate(limbs):
    m = m | shifted(limb, 16 * index - shift)
  e = 31 - jax.lax.clz(jnp.maximum(m, 1)).astype(jnp.int32)
  threshold_bit = shift + e - 53
  bit_set = any_bits(threshold_bit, threshold_bit + 1)
  above = any_bits(threshold_bit + 1, jnp.minimum(shift, width)) | (
      bit_set & any_bits(jnp.zeros_like(threshold_bit), threshold_bit))
  k = jnp.where(m == 0, 1, m + above.astype(jnp.uint32))
  n = n.astype(jnp.int32)
  return jnp.where(n > 0, jnp.clip(k.astype(jnp.int32), 1, n), 0)


# --- combining partial results ------------------------------------------------------------------

class Across(NamedTuple):
  """How per-device partial results combine into global ones.

  Unsharded: no axes, nothing to do. Inside a `shard_map`, every leaf is this device's block:
  sums are masked to one copy of each block (``weights``: 1 on the first device along every
  mesh axis the leaf is replicated over, else 0) and then summed over all mesh axes; maxima
  need no mask. Each pass of a search all-reduces a few scalars: one sum (the counts) and
  one max (the extremes).
  """
  axes: tuple = ()
  weights: tuple | None = None  # per leaf, None when unsharded
  sizes: tuple | None = None  # global leaf sizes, None when unsharded
  # per leaf, the mesh axes it is replicated over (leaves alike here share their weight and
  # can be packed together), None when unsharded
  replicated_over: tuple | None = None

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


UNSHARDED = Across()

# Leaves smaller than this are searched as one packed vector (a copy of a few hundred KB at
# most: 165K of ResNet-152's 58M coordinates sit in 313 of its 467 leaves). Every leaf costs a
# reduction in every pass, unrolled in the program: ResNet-152's search compiled in 38 s with
# one reduction per leaf, and on an accelerator each small one costs a kernel launch.
PACK_BELOW = 2 ** 14
# An unsharded group of at most this many coordinates is packed whole, large leaves included
# (a copy of at most 1 MiB; XLA compiles about 35 ms per leaf's reduce on 2 cores).
PACK_WHOLE_AT_MOST = 1 << 18


def _pack_small(leaves, group_of_leaf, group_sizes, across: Across, fmt: KeyFormat,
                below: int):
  """The leaves with the small ones of each group (and, sharded, of each replication
  pattern) concatenated into one vector in the key float dtype: the same multiset of |g|
  (bfloat16 and float16 widen exactly), so the same k-th largest. An unsharded group of at
  most `PACK_WHOLE_AT_MOST` coordinates is packed whole; ``below=0`` packs nothing."""
  classes = across.replicated_over or (None,) * len(leaves)
  sizes = across.global_sizes(leaves)
  bins = {}
  for index, (leaf, group, cls) in enumerate(zip(leaves, group_of_leaf, classes)):
    whole = (below > 0 and across.weights is None
             and group_sizes[group] <= PACK_WHOLE_AT_MOST)
    if leaf.size < below or whole:
      bins.setdefault((group, cls), []).append(index)
  packs = [members for members in bins.values() if len(members) > 1]
  if not packs:
    return leaves, group_of_leaf, across
  packed = {i for members in packs for i in members}
  kept = [i for i in range(len(leaves)) if i not in packed]
  new_leaves = [leaves[i] for i in kept] + [
      jnp.concatenate([jnp.ravel(leaves[i]).astype(fmt.float_dtype) for i in members])
      for members in packs]
  new_groups = [group_of_leaf[i] for i in kept] + [group_of_leaf[m[0]] for m in packs]
  if across.weights is None:
    return new_leaves, new_groups, across
  pick = lambda values: tuple(values[i] for i in kept) + tuple(values[m[0]] for m in packs)
  return new_leaves, new_groups, across._replace(
      weights=pick(across.weights), replicated_over=pick(classes),
      sizes=tuple(sizes[i] for i in kept) + tuple(sum(sizes[i] for i in m) for m in packs))


class _Problem(NamedTuple):
  """One selection problem: leaves split into groups, each with its own k."""
  leaves: list  # the floating leaves as given; |g| and its key are taken inside every pass
  group_of_leaf: list  # static group index per leaf
  num_groups: int
  fmt: KeyFormat
  across: Across


def _group_combine(per_leaf: list, problem: _Problem, combine, fill):
  """Combines per-leaf arrays of shape (P,) into per-group arrays of shape (G, P).

  ``combine`` is jnp.add or jnp.maximum; across devices (see `Across`) the table is then
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


def _reduce_leaf(operands, init, combine, ndim):
  return jax.lax.reduce(operands, init, combine, tuple(range(ndim)))


# --- the passes -------------------------------------------------------------------------------

class _Summary(NamedTuple):
  non_finite: jax.Array  # (G,) int32
  smallest: jax.Array  # (G,) smallest finite key (inf_key where there is none)
  largest: jax.Array  # (G,) largest finite key (0 where there is none)
  mean: jax.Array | None  # (G,) mean finite |g| in float32, only when asked for


def _summary_pass(problem: _Problem, sizes, with_mean: bool, pivots=None):
  """The first pass: per group, the non-finite count and the finite extremes (and the mean
  finite |g| for first pivots without a sample). With ``pivots`` (G, P), the same pass also
  counts the finite |g| >= each pivot (a warm start's bracket) and returns
  ``(summary, counts)``."""
  fmt = problem.fmt
  inf_key = jnp.asarray(fmt.inf_key, fmt.key_dtype)
  num_pivots = 0 if pivots is None else pivots.shape[1]
  base = 4 if with_mean else 3

  def combine(x, y):
    out = (x[0] + y[0], jnp.maximum(x[1], y[1]), jnp.minimum(x[2], y[2]))
    out += (x[3] + y[3],) if with_mean else ()
    return out + tuple(a + b for a, b in zip(x[base:], y[base:]))

  init = (jnp.zeros((), jnp.int32), jnp.zeros((), fmt.key_dtype), inf_key)
  init += (jnp.zeros((), jnp.float32),) if with_mean else ()
  init += (jnp.zeros((), jnp.int32),) * num_pivots
  counts, extremes, sums, above = [], [], [], []
  for raw, group in zip(problem.leaves, problem.group_of_leaf):
    key = _keys(fmt, raw)
    finite = key < inf_key
    operands = ((~finite).astype(jnp.int32), jnp.where(finite, key, 0),
                jnp.where(finite, key, inf_key))
    if with_mean:
      operands += (jnp.where(finite, jnp.abs(raw), 0).astype(jnp.float32),)
    operands += tuple((finite & (key >= pivots[group, p])).astype(jnp.int32)
                      for p in range(num_pivots))
    out = _reduce_leaf(operands, init, combine, key.ndim)
    counts.append(out[0][None])
    extremes.append(jnp.stack([out[1], -out[2]]))  # both maximised: largest, -smallest
    if with_mean:
      sums.append(out[3][None])
    if num_pivots:
      above.append(jnp.stack(out[base:]))
  non_finite = _group_combine(counts, problem, jnp.add, 0)[:, 0]
  extremes = _group_combine(extremes, problem, jnp.maximum, -inf_key)
  mean = None
  if with_mean:
    total = _group_combine(sums, problem, jnp.add, 0.0)[:, 0]
    mean = total / jnp.maximum(sizes - non_finite, 1)
  summary = _Summary(non_finite, -extremes[:, 1], extremes[:, 0], mean)
  if pivots is None:
    return summary
  return summary, _group_combine(above, problem, jnp.add, 0)


def _count_pass(problem: _Problem, non_finite, pivots, lo, hi):
  """One narrowing pass, per group: counts of finite |g| >= each pivot, the largest key
  below hi and the smallest key in [lo, hi). Shapes: pivots (G, P), lo and hi (G,) ->
  (G, P), (G,), (G,).

  Every leaf is one `lax.reduce` over P + 2 operands; XLA fuses the compares into it, so no
  full-size intermediate is stored. Pivots lie below inf_key, so the non-finite entries
  (counted by the summary pass) are counted at every pivot and subtracted.
  """
  fmt = problem.fmt
  num_pivots = pivots.shape[1]
  inf_key = jnp.asarray(fmt.inf_key, fmt.key_dtype)

  def combine(x, y):
    sums = tuple(a + b for a, b in zip(x[:num_pivots], y[:num_pivots]))
    return sums + (jnp.maximum(x[-2], y[-2]), jnp.minimum(x[-1], y[-1]))

  init = ((jnp.zeros((), jnp.int32),) * num_pivots
          + (jnp.zeros((), fmt.key_dtype), inf_key))
  counts, extremes = [], []
  for raw, group in zip(problem.leaves, problem.group_of_leaf):
    key = _keys(fmt, raw)
    below_hi = key < hi[group]
    operands = tuple((key >= pivots[group, p]).astype(jnp.int32) for p in range(num_pivots))
    operands += (jnp.where(below_hi, key, 0),
                 jnp.where(below_hi & (key >= lo[group]), key, inf_key))
    out = _reduce_leaf(operands, init, combine, key.ndim)
    counts.append(jnp.stack(out[:num_pivots]))
    extremes.append(jnp.stack([out[-2], -out[-1]]))  # both maximised: largest, -smallest
  counts = _group_combine(counts, problem, jnp.add, 0)
  extremes = _group_combine(extremes, problem, jnp.maximum, -inf_key)
  return counts - non_finite[:, None], extremes[:, 0], -extremes[:, 1]


def _mean_pivots(fmt: KeyFormat, mean, q):
  """First pivots without a sample (sharded leaves): multiples of the mean |g| per group.

  Gathering a sample across devices would cost more communication than the whole search;
  the mean comes with the summary pass. Later passes interpolate from the exact counts.
  """
  # Heavier tails and smaller q push the k-th largest above the mean.
  centre = mean * (1 - jnp.log(jnp.clip(q, 1e-7, 1.0)))
  multipliers = jnp.asarray(np.geomspace(1 / 16, 16, _PIVOTS), jnp.float32)
  return _value_to_key((centre[:, None] * multipliers[None]).astype(fmt.float_dtype), fmt)


def _sample_pivots(problem: _Problem, q):
  """Pivots per group bracketing the k-th largest of a strided sample of each group."""
  fmt = problem.fmt
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
    key = _keys(fmt, jnp.ravel(sample))
    members[group].append(jnp.where(key < fmt.inf_key, key, 0))  # non-finite: least
  pivots = []
  for group in range(problem.num_groups):
    if not members[group]:
      pivots.append(jnp.zeros((_PIVOTS,), fmt.key_dtype))
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
  pivots: jax.Array  # (G, P) keys for the next pass
  width_before: jax.Array  # (G,) c_lo - c_hi before the last pass
  step: jax.Array

  @property
  def active(self):
    return (self.hi - self.lo) > 1


def _solve(s: _SearchState, solved, answer) -> _SearchState:
  return s._replace(lo=jnp.where(solved, answer, s.lo), hi=jnp.where(solved, answer + 1, s.hi))


def _finish_at_extremes(s: _SearchState, k, largest, smallest, active) -> _SearchState:
  """The answer is the bracket's largest element when r == 1, its smallest when r == width
  (largest and smallest: the extremes of the bracket's elements)."""
  r = k - s.c_hi
  top = active & (r == 1) & (s.hi == largest + 1)
  bottom = active & (r == s.c_lo - s.c_hi) & (s.lo == smallest)
  return _solve(s, top | bottom, jnp.where(top, largest, smallest))


def _narrow(s: _SearchState, k, counts, largest, smallest) -> _SearchState:
  """The bracket after a pass: lo up to the highest pivot with count >= k, hi down to the
  lowest with count < k, then both onto the extremes of the old bracket's elements."""
  active = s.active
  ge = counts >= k[:, None]
  from_lo = jnp.max(jnp.where(ge, s.pivots, s.lo[:, None]), axis=1)
  from_hi = jnp.min(jnp.where(ge, s.hi[:, None], s.pivots), axis=1)
  c_lo = jnp.max(jnp.where(ge & (s.pivots == from_lo[:, None]), counts, -1), axis=1)
  c_hi = jnp.max(jnp.where(~ge & (s.pivots == from_hi[:, None]), counts, -1), axis=1)
  c_lo = jnp.where(from_lo > s.lo, c_lo, s.c_lo)
  c_hi = jnp.where(from_hi < s.hi, c_hi, s.c_hi)
  # No element of the old bracket lies in [old lo, smallest) or in (largest, old hi), so
  # moving the ends there keeps both counts.
  lo = jnp.maximum(from_lo, smallest)
  hi = jnp.minimum(from_hi, (largest + 1).astype(s.lo.dtype))
  new = s._replace(lo=jnp.where(active, lo, s.lo), hi=jnp.where(active, hi, s.hi),
                   c_lo=jnp.where(active, c_lo, s.c_lo), c_hi=jnp.where(active, c_hi, s.c_hi),
                   width_before=jnp.where(active, s.c_lo - s.c_hi, s.width_before))
  return _finish_at_extremes(new, k, largest, smallest, active)


def _next_pivots(fmt: KeyFormat, s: _SearchState, k):
  """Pivots where the counts, linearly interpolated in value, cross k ± a spread.

  Inside a narrow bracket the count is close to linear in the value; the error is a small
  fraction of the bracket plus the counting noise of its elements, ~sqrt(width). Key-space
  splitting bounds the worst case: when the last pass did not halve the bracket, without a
  finite upper bound, and when few keys are left.
  """
  k = k.astype(jnp.float32)
  width = jnp.maximum(s.c_lo - s.c_hi, 1).astype(jnp.float32)
  spread = width * _SPREAD_LINEAR + _SPREAD_NOISE * jnp.sqrt(width) + 1
  targets = k[:, None] + spread[:, None] * jnp.asarray(_INTERP_Z, jnp.float32)[None]
  fractions = jnp.clip((s.c_lo[:, None] - targets) / width[:, None], 0.0, 1.0)
  lo_value = key_to_value(s.lo, fmt)
  hi_value = key_to_value(s.hi, fmt)
  values = lo_value[:, None] + (hi_value - lo_value)[:, None] * fractions.astype(
      fmt.float_dtype)
  interpolated = _value_to_key(values, fmt)
  span = s.hi - s.lo
  parts = _PIVOTS + 1
  j = jnp.arange(1, parts, dtype=span.dtype)[None]
  # lo + floor(span · j / parts) without overflow
  split = s.lo[:, None] + (span // parts)[:, None] * j + ((span % parts)[:, None] * j) // parts
  stalled = (s.c_lo - s.c_hi) * 2 > s.width_before
  use_split = stalled | ~jnp.isfinite(hi_value) | (span <= 4 * parts)
  pivots = jnp.where(use_split[:, None], split, interpolated)
  return jnp.clip(pivots, (s.lo + 1)[:, None], (s.hi - 1)[:, None])


def _warm_pivots(fmt: KeyFormat, hint):
  """Pivots (G, P), ascending, around last step's thresholds ``hint`` (G,): the hint's key
  and the key after it (an unchanged τ is then settled by the first pass), and relative
  steps of 0.2%, 1% and 5% either side (gradients drift by about that much a step)."""
  below = jnp.asarray([0.95, 0.99, 0.998], fmt.float_dtype)
  above = jnp.asarray([1.002, 1.01, 1.05], fmt.float_dtype)
  key = _value_to_key(hint, fmt)
  return jnp.concatenate([_value_to_key(hint[:, None] * below[None], fmt), key[:, None],
                          (key + 1)[:, None], _value_to_key(hint[:, None] * above[None], fmt)],
                         axis=1)


def kth_largest_keys(leaves: Sequence[jax.Array], fraction, *, per_leaf: bool = False,
                     across: Across = UNSHARDED, sample: bool = True, hint=None,
                     pack_below: int = PACK_BELOW):
  """Per group, the key of the k-th largest finite |g|, k = `top_count(fraction, n)`.

  Args:
    leaves: floating-point arrays (this device's blocks inside a `shard_map`).
    fraction: a Python float or a traced scalar in (0, 1], already validated.
    per_leaf: one group per leaf instead of one group over all leaves.
    across: how partial results combine across devices (see `Across`).
    sample: seed the first pivots from a strided sample of the leaves (a gather); without
      it, from the mean |g| (what sharded leaves use).
    hint: optional (G,) thresholds near the answer (last step's τ). The first pass then
      also counts at pivots around them, and a hit leaves a narrow bracket; the answer is
      the same with or without it, only the number of passes differs. A non-finite or
      negative hint is ignored.
    pack_below: leaves smaller than this (and every leaf of an unsharded group of at most
      `PACK_WHOLE_AT_MOST` coordinates) are searched as one concatenated vector per group
      (0: every leaf on its own).

  Returns:
    ``(keys, passes, finite)``: keys of shape (G,) in the `KeyFormat` of ``key_format`` of
    the leaves' dtypes (its ``inf_key`` for a group without finite coordinates: τ = +inf;
    `key_to_value` turns keys into thresholds), the number of narrowing passes run, and
    the (G,) int32 counts n of finite coordinates (the clip statistics' denominator, which
    the first pass has counted).
  """
  fmt = key_format([l.dtype for l in leaves])
  num_groups = len(leaves) if per_leaf else 1
  group_of_leaf = list(range(len(leaves))) if per_leaf else [0] * len(leaves)
  global_sizes = across.global_sizes(leaves)
  if max([sum(global_sizes)] + global_sizes) >= 2 ** 31 - 1:
    raise ValueError("clip_threshold: trees with 2^31 or more coordinates are not supported")
  group_sizes = [0] * num_groups
  for size, group in zip(global_sizes, group_of_leaf):
    group_sizes[group] += size
  sizes = jnp.asarray(group_sizes, jnp.int32)
  leaves, group_of_leaf, across = _pack_small(list(leaves), group_of_leaf, group_sizes,
                                              across, fmt, pack_below)
  problem = _Problem(leaves, group_of_leaf, num_groups, fmt, across)
  inf_key = jnp.asarray(fmt.inf_key, fmt.key_dtype)

  with_mean = not sample
  if hint is None:
    summary = _summary_pass(problem, sizes, with_mean)
  else:
    hint = jnp.broadcast_to(jnp.asarray(hint).astype(fmt.float_dtype), (num_groups,))
    valid = jnp.isfinite(hint) & (hint >= 0)
    warm_pivots = _warm_pivots(fmt, jnp.where(valid, hint, 0))
    # A hint that cannot bracket anything (the first step's τ = inf) runs today's first
    # pass, without the pivots' compares.
    summary, warm_counts = jax.lax.cond(
        jnp.any(valid),
        lambda: _summary_pass(problem, sizes, with_mean, warm_pivots),
        lambda: (_summary_pass(problem, sizes, with_mean),
                 jnp.zeros(warm_pivots.shape, jnp.int32)))
  n = sizes - summary.non_finite
  k = top_count(fraction, n)
  q = k.astype(jnp.float32) / jnp.maximum(n, 1).astype(jnp.float32)
  largest, smallest = summary.largest, summary.smallest

  def cold_pivots():
    return _sample_pivots(problem, q) if sample else _mean_pivots(fmt, summary.mean, q)

  state = _SearchState(
      lo=smallest, hi=(largest + 1).astype(fmt.key_dtype), c_lo=n,
      c_hi=jnp.zeros((num_groups,), jnp.int32),
      pivots=cold_pivots() if hint is None else warm_pivots, width_before=n,
      step=jnp.zeros((), jnp.int32))
  state = _finish_at_extremes(state, k, largest, smallest, state.active)
  state = _solve(state, n == 0, inf_key)  # no finite coordinate: τ = +inf
  if hint is not None:
    # The warm pass's counts narrow the bracket as a search pass would. Where k lies between
    # the lowest and the highest warm pivot (a hit) the next pivots interpolate in that
    # narrow bracket; where it does not, the cold search's first pivots take over in what
    # is left of the bracket. Either way the search below is the same exact one.
    hit = valid & (warm_counts[:, 0] >= k) & (warm_counts[:, -1] < k)
    narrowed = _narrow(state, k, warm_counts, largest, smallest)
    state = narrowed._replace(**{
        field: jnp.where(valid, getattr(narrowed, field), getattr(state, field))
        for field in ("lo", "hi", "c_lo", "c_hi", "width_before")})
    interpolated = _next_pivots(fmt, state, k)
    pivots = jax.lax.cond(jnp.all(hit | ~state.active), lambda: interpolated,
                          lambda: jnp.where(hit[:, None], interpolated, cold_pivots()))
    state = state._replace(pivots=pivots)
  state = state._replace(pivots=jnp.clip(state.pivots, (state.lo + 1)[:, None],
                                         (state.hi - 1)[:, None]))

  def body(s):
    # Tied to the loop counter, the leaves are not loop-invariant: XLA would otherwise hoist
    # their keys out of the loop and store them, a full-size copy of every leaf.
    leaves, _ = jax.lax.optimization_barrier((problem.leaves, s.step))
    counts, largest, smallest = _count_pass(problem._replace(leaves=leaves),
                                            summary.non_finite, s.pivots, s.lo, s.hi)
    s = _narrow(s, k, counts, largest, smallest)
    return s._replace(pivots=_next_pivots(fmt, s, k), step=s.step + 1)

  def cond(s):
    return jnp.any(s.active) & (s.step < _MAX_PASSES)

  final = jax.lax.while_loop(cond, body, state)
  return final.lo, final.step, n
