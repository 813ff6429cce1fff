"""Local geometry along update directions (Pan & Li 2023, Section 3 and Appendix B).

Every function takes ``loss_fn(params) -> scalar`` for any parameter pytree (Flax variables
included) and works on pytrees leaf by leaf: inner products are ``sum(jnp.sum(a * b))`` over
leaves, never a concatenation, so they also run on sharded parameters.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from optclip import sharding
from optclip.clipping import clip_threshold

__all__ = [
    "GradientCorrelation",
    "RobustSharpness",
    "TaylorTerms",
    "coordinate_histogram",
    "directional_sharpness",
    "gradient_correlation",
    "landscape",
    "attribution_terms",
    "map_directions",
    "second_derivative",
    "sharpness_attribution",
    "taylor_decomposition",
]

LossFn = Callable[[Any], jax.Array]


def tree_dot(a, b) -> jax.Array:
  """⟨a, b⟩ over all leaves, accumulated in float32 at least.

  Not `optax.tree.vdot`: optax 0.2.8 picks its implementation by comparing version strings,
  and "0.10.2" < "0.7.2", so on jax 0.10 it takes `jnp.vdot`, whose ravel of an explicitly
  sharded axis raises. ``jnp.sum(a * b)`` per leaf runs on sharded leaves as they are.
  """
  terms = [jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)) * y)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return sum(terms) if terms else jnp.zeros(())


def tree_norm(a) -> jax.Array:
  return jnp.sqrt(tree_dot(a, a))


def _axpy(alpha, x, y):
  """y + alpha · x, leaf by leaf, in y's dtypes."""
  return jax.tree.map(lambda xi, yi: (yi + alpha * xi).astype(yi.dtype), x, y)


def _is_batched(params, directions) -> bool:
  """Whether ``directions`` carry a leading axis of K directions; checks, as trees, that
  they match ``params`` (the same keys, not just as many leaves), naming the first leaf
  whose shape fits neither way."""
  p_structure, d_structure = jax.tree.structure(params), jax.tree.structure(directions)
  if p_structure != d_structure:
    raise ValueError(f"directions must have the structure of params: params are "
                     f"{p_structure}, directions {d_structure}")
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  p_leaves, d_leaves = jax.tree.leaves(params), jax.tree.leaves(directions)
  unbatched = [jnp.shape(d) == jnp.shape(p) for p, d in zip(p_leaves, d_leaves)]
  if all(unbatched):
    return False
  batched = [jnp.ndim(d) > 0 and jnp.shape(d)[1:] == jnp.shape(p)
             for p, d in zip(p_leaves, d_leaves)]
  if not all(batched):
    # A leaf that fits neither way, else one unbatched among batched ones.
    bad = next((i for i, (u, b) in enumerate(zip(unbatched, batched)) if not u and not b),
               batched.index(False))
    raise ValueError(f"directions{paths[bad]} has shape {jnp.shape(d_leaves[bad])}; "
                     f"params{paths[bad]} has {jnp.shape(p_leaves[bad])}: expected (K, "
                     "*that shape) like the other leaves, or that shape on every leaf")
  sizes = {jnp.shape(d)[0] for d in d_leaves}
  if len(sizes) != 1:
    raise ValueError(f"directions must share one leading axis of size K; got sizes "
                     f"{sorted(sizes)}")
  return True


def _refuse_zero_directions(directions, batched: bool) -> None:
  """A zero direction has no directional sharpness (0/0): refused where the directions are
  concrete; under `jit` its value is NaN, as documented."""
  leaves = jax.tree.leaves(directions)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return
  squared = sum(jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)),
                        axis=tuple(range(1 if batched else 0, jnp.ndim(leaf))))
                for leaf in leaves)
  zero = [int(i) for i in jnp.flatnonzero(jnp.atleast_1d(squared) == 0)]
  if zero:
    raise ValueError(f"directions: {'direction(s) ' + str(zero) if batched else 'the direction'}"
                     " is zero, where directional sharpness uᵀHu/‖u‖² is undefined")


def map_directions(fn, xs, *, batch_size: int | None = None):
  """``fn`` over the leading axis of ``xs``: vmapped (``batch_size`` at a time if given).

  Under an explicit-sharding mesh some batching rules (convolutions over a batch split along
  ``data``) would merge the mapped axis into a sharded one, which JAX refuses; the map then
  runs sequentially (`jax.lax.map` without batching), which gives the same values.
  """
  try:
    if batch_size is None:
      return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=None if batch_size == 1 else batch_size)
  except Exception as error:  # noqa: BLE001 - only JAX's ShardingTypeError (not public)
    if type(error).__name__ != "ShardingTypeError":
      raise
    return jax.lax.map(fn, xs)


def second_derivative(loss_fn: LossFn, params, direction, method: str) -> jax.Array:
  """uᵀ∇²f(x)u, exactly: by Taylor mode ("jet"), forward mode ("forward", a jvp of a jvp) or
  forward-over-reverse ("hvp"); "auto" is jet, or forward where jet has no rule for an
  operation of ``loss_fn`` (custom_jvp functions such as jax.nn.relu, reduce_window_max) or
  fails under an explicit-sharding mesh."""
  if method == "auto":
    try:
      return second_derivative(loss_fn, params, direction, "jet")
    except (jax.errors.UnexpectedTracerError, KeyError, NotImplementedError):
      return second_derivative(loss_fn, params, direction, "forward")
    except Exception as error:  # noqa: BLE001 - JAX's ShardingTypeError is not public
      # jet's zero series terms carry no sharding, which explicit-sharding meshes refuse.
      if type(error).__name__ != "ShardingTypeError":
        raise
      return second_derivative(loss_fn, params, direction, "forward")
  if method == "forward":
    first = lambda x: jax.jvp(loss_fn, (x,), (direction,))[1]
    return jax.jvp(first, (params,), (direction,))[1]
  if method == "hvp":
    return tree_dot(direction, jax.jvp(jax.grad(loss_fn), (params,), (direction,))[1])
  if method == "jet":
    from jax.experimental import jet
    leaves, treedef = jax.tree.flatten(params)
    series = [(d, jnp.zeros_like(d)) for d in jax.tree.leaves(direction)]
    # jet takes arrays only: pass the leaves as separate arguments.
    _, (_, second) = jet.jet(lambda *xs: loss_fn(jax.tree.unflatten(treedef, xs)),
                             tuple(leaves), tuple(series))
    return second
  raise ValueError(f"method must be 'auto', 'jet', 'forward' or 'hvp', got {method!r}")


class RobustSharpness(NamedTuple):
  """Directional sharpness with Appendix B's Eq. (4) beside it.

  ``sharpness`` is the raw value at x; where it is negative (``shifted``), ``robust`` is the
  value re-evaluated at x + δ·u/‖u‖, elsewhere the raw value again.
  """
  sharpness: jax.Array
  robust: jax.Array
  shifted: jax.Array


def directional_sharpness(loss_fn: LossFn, params, directions, *,
                          robust_delta: float | None = None, method: str = "auto",
                          batch_size: int | None = 1):
  """Directional sharpness uᵀ∇²f(x)u / ‖u‖² of one or K update directions (Section 3.1).

  Computed exactly, never by finite differences: the second derivative of t ↦ f(x + tu) by
  Taylor-mode AD (``method="auto"``: `jax.experimental.jet`, falling back to a jvp of a jvp
  where jet has no rule; the fastest in benchmarks/geometry.py on every model there). K
  directions (every leaf carrying a leading axis of size K) are evaluated in one call,
  ``batch_size`` at a time on every backend (default 1, which measured fastest on CPU in
  benchmarks/geometry.py and keeps one direction's tangents in memory; None vmaps all K
  together, sharing the primal computation).

  With ``robust_delta=δ``, a direction whose sharpness is negative is also evaluated at
  x + δ·u/‖u‖ (Appendix B, Eq. 4; the paper uses δ = 0.01); the raw value is kept beside it.

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    directions: a pytree shaped like params, or with a leading axis of size K on every leaf.
    robust_delta: δ for the robust variant, or None.
    method: "auto" (jet, else forward), "jet" (second-order Taylor mode), "forward" (jvp of
      jvp) or "hvp" (jvp of grad).
    batch_size: directions evaluated together (see above).

  Returns:
    A scalar, or shape (K,); with ``robust_delta`` a `RobustSharpness` of those.

  Raises:
    ValueError: naming the leaf, where ``directions`` do not match ``params`` as a tree (the
      same keys) or in shape; where a direction is zero (sharpness 0/0 is undefined; under
      `jit` it comes out NaN).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> loss = lambda x: jnp.sum(jnp.array([100., 1.]) * x ** 2)
    >>> round(float(optclip.directional_sharpness(loss, jnp.ones(2), jnp.array([1., 0.]))), 3)
    200.0

  References:
    Pan & Li 2023, arXiv 2306.00204, Section 3.1 and Appendix B.
  """
  batched = _is_batched(params, directions)
  _refuse_zero_directions(directions, batched)
  return _sharpness(loss_fn, params, directions, batched, robust_delta, method, batch_size)


def _sharpness(loss_fn, params, directions, batched, robust_delta, method, batch_size):
  """`directional_sharpness` without the checks (a zero direction gives NaN)."""

  def one(direction):
    value = second_derivative(loss_fn, params, direction, method)
    return value / tree_dot(direction, direction)

  def shifted_one(direction):
    unit = jax.tree.map(lambda d: d / tree_norm(direction), direction)
    point = _axpy(robust_delta, unit, params)
    value = second_derivative(loss_fn, point, direction, method)
    return value / tree_dot(direction, direction)

  over = lambda fn: functools.partial(map_directions, fn, batch_size=batch_size)
  evaluate = over(one) if batched else one
  sharpness = evaluate(directions)
  if robust_delta is None:
    return sharpness
  negative = sharpness < 0
  evaluate_shifted = over(shifted_one) if batched else shifted_one
  shifted_values = jax.lax.cond(jnp.any(negative), evaluate_shifted,
                                lambda d: sharpness, directions)
  return RobustSharpness(sharpness, jnp.where(negative, shifted_values, sharpness), negative)


class GradientCorrelation(NamedTuple):
  """First-order term of Eq. (1) for a normalized update direction u.

  ``projection`` = ⟨∇f, u⟩ / ‖u‖ (the directional derivative along the unit direction; negative
  for a descent direction), ``cosine`` = ⟨∇f, u⟩ / (‖∇f‖ ‖u‖) in [-1, 1].
  """
  projection: jax.Array
  cosine: jax.Array


def gradient_correlation(grad, update) -> GradientCorrelation:
  """⟨∇f, u⟩/‖u‖ and the cosine between the gradient and an update (Section 3.1).

  Args:
    grad: ∇f(x), a pytree.
    update: u, a pytree like ``grad``.

  Returns:
    A `GradientCorrelation` (``projection``, ``cosine``), scalars.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> optclip.gradient_correlation(jnp.array([3., 4.]), jnp.array([-1., 0.])).projection
    Array(-3., dtype=float32)
  """
  dot = tree_dot(grad, update)
  norm_u = tree_norm(update)
  return GradientCorrelation(dot / norm_u, dot / (norm_u * tree_norm(grad)))


class TaylorTerms(NamedTuple):
  """Eq. (1): f(x + u) ≈ loss + first_order + second_order = predicted."""
  loss: jax.Array
  first_order: jax.Array  # ∇f(x)ᵀu
  second_order: jax.Array  # ½ uᵀ∇²f(x)u
  predicted: jax.Array


def taylor_decomposition(loss_fn: LossFn, params, update) -> TaylorTerms:
  """The quadratic Taylor expansion of the loss along an update step (Eq. 1).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> from optclip import geometry
    >>> terms = geometry.taylor_decomposition(lambda x: jnp.sum(x ** 2), jnp.ones(2), -jnp.ones(2))
    >>> [float(t) for t in terms]
    [2.0, -4.0, 2.0, 0.0]
  """
  def first(x):
    return jax.jvp(loss_fn, (x,), (update,))

  (loss, first_order), (_, second) = jax.jvp(first, (params,), (update,))
  second_order = 0.5 * second
  return TaylorTerms(loss, first_order, second_order, loss + first_order + second_order)


def landscape(loss_fn: LossFn, params, directions, step_sizes, *,
              batch_size: int | None = 1) -> jax.Array:
  """Loss at x + s·u/‖u‖ for every direction u and step size s (Figures 2-4).

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    directions: a pytree shaped like params, or with a leading axis of size K.
    step_sizes: shape (S,) (the step size is the distance travelled, since u is normalized).
    batch_size: evaluate this many (direction, step) pairs at a time, on every backend
      (default 1: on CPU a vmapped forward with per-pair weights runs ~4x slower than a
      sequential scan; None: all at once, K·S copies of the activations).

  Returns:
    Shape (K, S), or (S,) for one direction.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> optclip.landscape(lambda x: jnp.sum(x ** 2), jnp.ones(2), jnp.array([-1., 0.]),
    ...                   jnp.array([0., 1.]))
    Array([2., 1.], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Figures 2-4 and Appendix B ("Landscape Visualization").
  """
  batched = _is_batched(params, directions)
  if not batched:
    directions = jax.tree.map(lambda d: d[None], directions)
  step_sizes = jnp.asarray(step_sizes)
  norms = jax.vmap(tree_norm)(directions)
  num_directions, num_steps = norms.shape[0], step_sizes.shape[0]

  def loss_at(index):
    k, s = index // num_steps, index % num_steps
    u = jax.tree.map(lambda d: d[k], directions)
    return loss_fn(_axpy(step_sizes[s] / norms[k], u, params))

  indices = jnp.arange(num_directions * num_steps)
  losses = map_directions(loss_at, indices, batch_size=batch_size)
  losses = losses.reshape(num_directions, num_steps)
  return losses if batched else losses[0]


def attribution_terms(update, hvp, fractions: Sequence[float], *, select_by=None,
                      thresholds=None, select_thresholds=None):
  """The parts of `sharpness_attribution` that need no second derivatives, given Hu.

  Args:
    update: u.
    hvp: Hu.
    fractions: the top fractions f.
    select_by: the tree whose magnitudes pick the top coordinates (default u).
    thresholds: u's own top-f thresholds, one per fraction, where the caller has them
      (each is an exact selection over every coordinate: worth computing once).
    select_thresholds: the same of ``select_by``, where the caller has them.

  Returns:
    ``(share, norm_share, modified)``: arrays of shape (F,) and the 2F modified directions
    (u without T for every fraction, then u clipped for every fraction) stacked along a
    leading axis, whose directional sharpness completes the attribution.
  """
  select_by = update if select_by is None else select_by
  total = tree_dot(update, hvp)
  norm_sq = tree_dot(update, update)
  if thresholds is None:
    thresholds = [clip_threshold(update, fraction) for fraction in fractions]
  if select_thresholds is None:
    select_thresholds = (thresholds if select_by is update else
                         [clip_threshold(select_by, fraction) for fraction in fractions])
  top = lambda tau_select: jax.tree.map(lambda s: jnp.abs(s) >= tau_select, select_by)

  def shares(tau_select):
    masks = jax.tree.leaves(top(tau_select))
    return (sum(jnp.sum(jnp.where(t, u * h, 0)) for u, h, t in zip(
        jax.tree.leaves(update), jax.tree.leaves(hvp), masks)) / total,
            sum(jnp.sum(jnp.where(t, u * u, 0)) for u, t in zip(
                jax.tree.leaves(update), masks)) / norm_sq)

  # One fraction at a time: XLA on CPU materialises the operand of every large reduction,
  # and the fractions' sums side by side would hold one parameter-sized temporary each.
  share, norm_share = jax.lax.map(shares, jnp.stack(select_thresholds))
  without = [jax.tree.map(lambda u, t: jnp.where(t, 0, u), update, top(tau_select))
             for tau_select in select_thresholds]
  clipped = [jax.tree.map(lambda u, tau=tau: jnp.clip(u, -tau, tau), update)
             for tau in thresholds]
  modified = jax.tree.map(lambda *d: jnp.stack(d), *(without + clipped))
  return share, norm_share, modified


def sharpness_attribution(loss_fn: LossFn, params, update,
                          fractions: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.5), *,
                          select_by=None) -> dict:
  """How much of uᵀHu comes from the largest coordinates (Sections 4.1-4.2).

  The quadratic form splits over coordinates, uᵀHu = Σᵢ uᵢ(Hu)ᵢ. For each fraction f, with T
  the coordinates at or above the top-f threshold of ``|s|`` (`clip_threshold`), where s is
  ``select_by`` (e.g. the gradient, for the paper's gradient-Hessian correlation) or u
  itself, this returns

  * ``share``: Σ_{i∈T} uᵢ(Hu)ᵢ / uᵀHu, the top coordinates' share of the sharpness;
  * ``norm_share``: Σ_{i∈T} uᵢ² / ‖u‖², their share of the squared norm;
  * ``sharpness_without``: the directional sharpness of u with the coordinates in T zeroed
    (NaN where T is every coordinate with a nonzero uᵢ);
  * ``sharpness_clipped``: the directional sharpness of u clipped at its own top-f threshold.

  Returns:
    A dict of arrays of shape (len(fractions),), plus ``sharpness`` (the full direction's).
  """
  hvp = jax.jvp(jax.grad(loss_fn), (params,), (update,))[1]
  share, norm_share, modified = attribution_terms(update, hvp, fractions,
                                                  select_by=select_by)
  # All 2·F modified directions in one call: one compiled second derivative.
  # Unchecked: at fraction 1 nothing is left of u, and its sharpness_without is NaN (0/0).
  sharpness = _sharpness(loss_fn, params, modified, True, None, "auto", 1)
  count = len(fractions)
  return {"fractions": jnp.asarray(fractions), "share": share, "norm_share": norm_share,
          "sharpness_without": sharpness[:count], "sharpness_clipped": sharpness[count:],
          "sharpness": tree_dot(update, hvp) / tree_dot(update, update)}


def coordinate_histogram(tree, bins: int | Sequence[float] = 60,
                         value_range: tuple[float, float] = (-14.0, 2.0)):
  """Histogram of log10 ``|x|`` over all coordinates of a pytree (Figure 1), without concatenating.

  Args:
    tree: e.g. SGD's momentum or Adam's update direction.
    bins: number of bins over ``value_range``, or explicit bin edges (in log10 units).
    value_range: (low, high) of log10 ``|x|``; values outside are counted in the end bins,
      exact zeros are counted separately.

  Returns:
    (counts, edges, zeros): counts of shape (bins,), edges of shape (bins + 1,), and the
    number of exact zeros.
  """
  edges = (jnp.linspace(value_range[0], value_range[1], bins + 1) if isinstance(bins, int)
           else jnp.asarray(bins))
  counts = jnp.zeros(edges.shape[0] - 1, jnp.int32)
  zeros = jnp.zeros((), jnp.int32)
  for leaf in jax.tree.leaves(tree):
    magnitude = jnp.abs(leaf.astype(jnp.float32))
    logs = jnp.clip(jnp.log10(jnp.where(magnitude > 0, magnitude, 1.0)), edges[0], edges[-1])
    if sharding.explicit_spec(leaf) is not None:
      # A sort-free search and a scatter need the leaf flat, which an explicitly sharded
      # axis refuses: count the coordinates at or above every lower edge instead (one
      # reduction per bin, each summed where the blocks lie) and take differences.
      nonzero = magnitude > 0
      at_or_above = jnp.stack([jnp.sum((nonzero & (logs >= edges[b])).astype(jnp.int32))
                               for b in range(counts.shape[0])])
      counts = counts + at_or_above - jnp.concatenate([at_or_above[1:],
                                                       jnp.zeros((1,), jnp.int32)])
    else:
      index = jnp.clip(jnp.searchsorted(edges, logs, side="right") - 1, 0,
                       counts.shape[0] - 1)
      weights = (magnitude > 0).astype(jnp.int32)
      counts = counts + jnp.zeros_like(counts).at[jnp.ravel(index)].add(jnp.ravel(weights))
    zeros = zeros + jnp.sum(magnitude == 0)
  return counts, edges, zeros
