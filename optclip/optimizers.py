"""The optimizer family of Pan & Li (2023), Algorithms 3-9, with coordinate-wise clipping.

Every optimizer returns an `optax.GradientTransformation` whose updates are already multiplied
by -learning_rate, as optax's own aliases do, and accepts an `optax.Schedule` as learning rate.

``clip`` clips the gradient coordinate-wise (`optclip.coord_clip`) before it enters the
*numerator* of the update (the first moment). Adaptive methods keep feeding the raw gradient
into their second moment: "the clipped gradient is only used in the first order momentum"
(Figure 5), since clipping both would cancel the clipping in the ratio. ``clip_update`` clips
the final update direction instead (Section 4.2, Appendix B.2). With both ``None`` every
optimizer is its unclipped algorithm; `adam` and `lion` take every argument of
`optax.adam`/`optax.lion`, with the same defaults, and then equal them.

Every clip keeps what it did in the optimizer's state, a `optclip.CoordClipState` (τ, the
number and fraction of coordinates clipped, ‖g‖ before and after):
``optax.tree_utils.tree_get(state, "threshold")`` reads it.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204), Appendix B.2.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from optclip.clipping import (CoordClipState, clip_with_state, coord_clip, init_clip_state,
                              validate_fraction)
from optclip.sharding import explicit_spec, placed_like

__all__ = [
    "adafactor",
    "adam",
    "lion",
    "normalized_sgd",
    "scale_by_clipped_adafactor",
    "scale_by_clipped_adam",
    "scale_by_clipped_lion",
    "scale_by_frobenius_normalization",
    "scale_by_damped_trace",
    "sgd",
    "sign_sgd",
    "signum",
]

ScalarOrSchedule = optax.ScalarOrSchedule
# Where an SGD-family momentum starts: Algorithm 3's box (m₀ = 0, so m₁ = (1 - β)g₁), or at
# the first gradient (m₁ = g₁, PyTorch's convention and the paper code's pseudo-optimizer).
MOMENTUM_STARTS = ("zero", "gradient")


def _optional_fraction(value, name):
  return None if value is None else validate_fraction(value, name)


def _maybe_clip(fraction) -> list:
  return [] if fraction is None else [coord_clip(fraction)]


def _clip_state(params, fraction) -> CoordClipState | optax.EmptyState:
  return optax.EmptyState() if fraction is None else init_clip_state(params)


def _clip(tree, fraction, state):
  """(ĝ, its new state): clipped at the top-``fraction`` threshold (already validated), or
  unchanged with an `optax.EmptyState` when fraction is None."""
  if fraction is None:
    return tree, state
  return clip_with_state(tree, fraction, state)


class MomentumState(NamedTuple):
  count: chex.Array
  momentum: optax.Updates


def _momentum(beta: float, start: str) -> optax.GradientTransformation:
  """m ← βm + (1 - β)ĝ, the paper's (1 - β)-damped momentum (optax.trace would omit 1 - β),
  starting as ``start`` says (see `MOMENTUM_STARTS`)."""
  return _ema(beta, None, start)


def _ema(beta, accumulator_dtype, start: str) -> optax.GradientTransformation:
  """The (1 - β)-damped momentum: `optax.ema` from m₀ = 0 (optax's state), else m₁ = ĝ₁."""
  if start == "zero":
    return optax.ema(beta, debias=False, accumulator_dtype=accumulator_dtype)
  return scale_by_damped_trace(beta, beta, accumulator_dtype=accumulator_dtype, start=start)


def scale_by_damped_trace(decay: float, dampening: float = 0.0, *, nesterov: bool = False,
                          accumulator_dtype: Optional[Any] = None, start: str = "zero"
                          ) -> optax.GradientTransformation:
  """Momentum with PyTorch's dampening: m_t = decay · m_{t-1} + (1 - dampening) · g_t.

  With ``dampening=0`` and ``start="zero"`` this is `optax.trace` (the same state, the same
  numbers); ``dampening=decay`` is the exponential moving average of the paper's boxes.
  ``start="gradient"`` sets m₁ = g₁ whatever the dampening (PyTorch's first step, and the
  paper code's pseudo-optimizers). ``nesterov`` returns g_t + decay · m_t, as optax and
  PyTorch do; like PyTorch it requires ``dampening=0``.

  Args:
    decay: the momentum β.
    dampening: d in [0, 1).
    nesterov: Nesterov's variant.
    accumulator_dtype: the dtype of m (default: the parameters').
    start: "zero" (m₀ = 0) or "gradient" (m₁ = g₁).

  Returns:
    An `optax.GradientTransformation` (state `optax.TraceState` for ``start="zero"``,
    `MomentumState` for ``start="gradient"``).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.scale_by_damped_trace(0.9, dampening=0.9)
    >>> tx.update(jnp.array([2.]), tx.init(jnp.zeros(1)))[0]
    Array([0.2], dtype=float32)
  """
  if start not in MOMENTUM_STARTS:
    raise ValueError(f"momentum_start must be one of {MOMENTUM_STARTS}, got {start!r}")
  if nesterov and not (isinstance(dampening, (int, float)) and dampening == 0):
    raise ValueError(f"nesterov=True needs dampening=0 (as in PyTorch), got {dampening!r}")
  if start == "zero" and isinstance(dampening, (int, float)) and dampening == 0:
    return optax.trace(decay, nesterov, accumulator_dtype)
  dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  zeros = lambda params: optax.tree.zeros_like(params, dtype=dtype)

  def next_trace(g, t, first):
    damped = decay * t + (1 - dampening) * g
    return jnp.where(first, g, damped) if first is not None else damped

  def init_fn(params):
    if start == "zero":
      return optax.TraceState(trace=zeros(params))
    return MomentumState(jnp.zeros([], jnp.int32), zeros(params))

  def update_fn(updates, state, params=None):
    del params
    if start == "zero":
      trace = jax.tree.map(lambda g, t: next_trace(g, t, None), updates, state.trace)
      new_state = optax.TraceState(trace=optax.tree.cast(trace, dtype))
    else:
      trace = jax.tree.map(lambda g, t: next_trace(g, t, state.count == 0), updates,
                           state.momentum)
      new_state = MomentumState(optax.safe_increment(state.count),
                                optax.tree.cast(trace, dtype))
    return trace, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None,
        nesterov: bool = False, accumulator_dtype: Optional[Any] = None, *,
        dampening: float = 0.0, momentum_start: str = "zero", clip: Optional[float] = None
        ) -> optax.GradientTransformation:
  """`optax.sgd` with coordinate-wise clipping and PyTorch's dampening (Algorithm 3).

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - d) ĝ_t;  x_t = x_{t-1} - η m_t

  With ``clip=None`` and ``dampening=0`` this is `optax.sgd` with the same arguments and
  defaults (no momentum unless asked). The paper's Algorithm 3 is ``momentum=0.9,
  dampening=0.9`` (m is an exponential moving average, so its step is 1 - β = 10 times
  smaller than optax's at the same η).

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    momentum: β, or None for plain SGD.
    nesterov: Nesterov momentum (needs ``dampening=0``).
    accumulator_dtype: the dtype of m.
    dampening: d (Algorithm 3: d = β).
    momentum_start: "zero" (m₀ = 0, optax and Algorithm 3) or "gradient" (m₁ = ĝ₁, as
      PyTorch and the paper's code start it).
    clip: fraction of coordinates to clip (the paper uses 0.1), or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.sgd(0.1, clip=1.0)  # clip=1: every coordinate clipped to min |g|
    >>> updates, _ = tx.update(jnp.array([4., 1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.1, -0.1], dtype=float32)
    >>> paper = optclip.sgd(0.1, momentum=0.9, dampening=0.9)  # Algorithm 3's box
    >>> paper.update(jnp.array([4., 1.]), paper.init(jnp.zeros(2)))[0]
    Array([-0.04, -0.01], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 3.
  """
  clip = _optional_fraction(clip, "clip")
  if momentum is None:
    if momentum_start not in MOMENTUM_STARTS:
      raise ValueError(f"momentum_start must be one of {MOMENTUM_STARTS}, got "
                       f"{momentum_start!r}")
    trace = optax.identity()  # as optax.sgd, so the states have the same structure
  else:
    trace = scale_by_damped_trace(momentum, dampening, nesterov=nesterov,
                                  accumulator_dtype=accumulator_dtype, start=momentum_start)
  return optax.chain(*_maybe_clip(clip), trace, optax.scale_by_learning_rate(learning_rate))


def scale_by_frobenius_normalization(eps: float = 0.0) -> optax.GradientTransformation:
  """Rescales every leaf M to M / ‖M‖_F · sqrt(size(M)) (Algorithm 4's v_t).

  Each leaf is one block: a weight matrix of shape (m, n) gets Frobenius norm sqrt(mn), i.e.
  unit RMS. Vectors (biases, norms) and higher-rank kernels are treated the same way, with
  their size in place of mn; a scalar becomes its sign. A zero leaf stays zero.

  Args:
    eps: added to ‖M‖_F.

  Returns:
    An `optax.GradientTransformation` without state.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.scale_by_frobenius_normalization()
    >>> [round(float(x), 4) for x in tx.update({"w": jnp.array([3., 4.])}, None)[0]["w"]]
    [0.8485, 1.1314]
  """
  def update_fn(updates, state, params=None):
    del params

    def normalize(m):
      norm = jnp.sqrt(jnp.sum(jnp.square(m)))
      scale = jnp.sqrt(jnp.asarray(m.size, m.dtype)) / (norm + eps)
      return jnp.where(norm > 0, m * scale, jnp.zeros_like(m))

    return jax.tree.map(normalize, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def normalized_sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.9, *,
                   clip: Optional[float] = None, momentum_start: str = "zero"
                   ) -> optax.GradientTransformation:
  """Normalized SGD with momentum, per weight matrix (Algorithm 4).

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - β) ĝ_t;  v_t = m_t / ‖m_t‖_F · sqrt(mn);
    x_t = x_{t-1} - η v_t

  applied to every leaf separately (see `scale_by_frobenius_normalization` for vectors and
  scalars). The threshold of ``clip`` is global over all leaves.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    momentum: β.
    clip: fraction of coordinates to clip (the paper uses 0.1), or None.
    momentum_start: "zero" (the algorithm box) or "gradient" (m₁ = ĝ₁); see `sgd`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.normalized_sgd(1.0)
    >>> updates, _ = tx.update({'w': jnp.array([[3., 4.]])}, tx.init({'w': jnp.zeros((1, 2))}))
    >>> updates['w']
    Array([[-0.84852815, -1.1313709 ]], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 4.
  """
  clip = _optional_fraction(clip, "clip")
  return optax.chain(*_maybe_clip(clip), _momentum(momentum, momentum_start),
                     scale_by_frobenius_normalization(),
                     optax.scale_by_learning_rate(learning_rate))


def sign_sgd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
  """`optax.sign_sgd`: x_t = x_{t-1} - η sgn(g_t), no momentum.

  Coordinate-wise clipping keeps every sign, so it would not change this optimizer; the
  paper's sign SGD with momentum, where it does, is `signum`.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.sign_sgd(0.5)
    >>> tx.update(jnp.array([4., -1e-3]), tx.init(jnp.zeros(2)))[0]
    Array([-0.5,  0.5], dtype=float32)

  References:
    Bernstein et al. 2018, signSGD (arXiv 1802.04434).
  """
  return optax.sign_sgd(learning_rate)


def signum(learning_rate: ScalarOrSchedule, beta: float = 0.9,
           accumulator_dtype: Optional[Any] = None, *, clip: Optional[float] = None,
           momentum_start: str = "zero") -> optax.GradientTransformation:
  """Sign SGD with momentum (Algorithm 5), `optax.signum` with coordinate-wise clipping.

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - β) ĝ_t;  x_t = x_{t-1} - η sgn(m_t)

  With ``clip=None`` this is `optax.signum` with the same arguments and defaults.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    beta: β.
    accumulator_dtype: the dtype of m.
    clip: fraction of coordinates to clip, or None.
    momentum_start: "zero" (the algorithm box) or "gradient" (m₁ = ĝ₁); see `sgd`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.signum(0.5)
    >>> tx.update(jnp.array([4., -1e-3]), tx.init(jnp.zeros(2)))[0]
    Array([-0.5,  0.5], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 5; Bernstein et al. 2018 (arXiv 1802.04434).
  """
  clip = _optional_fraction(clip, "clip")
  return optax.chain(*_maybe_clip(clip),
                     _ema(beta, accumulator_dtype, momentum_start),
                     optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate))


class ScaleByClippedAdamState(NamedTuple):
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates
  clip: CoordClipState  # what the numerator's clip did at the last step


def scale_by_clipped_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                          eps_root: float = 0.0, mu_dtype: Optional[Any] = None, *,
                          nesterov: bool = False, clip: Optional[float] = None
                          ) -> optax.GradientTransformation:
  """Adam's direction with the first moment fed the clipped gradient.

    ĝ = clip(g);  μ ← β₁μ + (1 - β₁)ĝ;  ν ← β₂ν + (1 - β₂)g²;
    u = μ̂ / (sqrt(ν̂ + ε_root) + ε),  μ̂ = μ / (1 - β₁ᵗ),  ν̂ = ν / (1 - β₂ᵗ)

  (Nesterov: μ̂ = β₁μ / (1 - β₁ᵗ⁺¹) + (1 - β₁)ĝ / (1 - β₁ᵗ)). The operations are those of
  `optax.scale_by_adam`, which this is, state included, when ``clip`` is None.

  Args:
    b1, b2, eps, eps_root, mu_dtype, nesterov: as `optax.scale_by_adam`.
    clip: fraction of coordinates of g to clip before μ, or None.

  Returns:
    An `optax.GradientTransformation` (state `ScaleByClippedAdamState`, or optax's).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.scale_by_clipped_adam(clip=0.5)
    >>> u, _ = tx.update(jnp.array([4., 1., 2.]), tx.init(jnp.zeros(3)))
    >>> [round(float(x), 3) for x in u]  # ĝ = (2, 1, 2) over sqrt(ν̂) = |g|
    [0.5, 1.0, 1.0]

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 6 and Figure 5.
  """
  clip = _optional_fraction(clip, "clip")
  if clip is None:
    return optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return ScaleByClippedAdamState(
        count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params), clip=init_clip_state(params))

  def update_fn(updates, state, params=None):
    del params
    numerator, clip_state = clip_with_state(updates, clip, state.clip)
    mu = optax.tree.update_moment(numerator, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: b1 * m + (1 - b1) * g,
          optax.tree.bias_correction(mu, b1, optax.safe_increment(count_inc)),
          optax.tree.bias_correction(numerator, b1, count_inc))
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree.map(
        lambda m, v: None if m is None else m / (jnp.sqrt(v + eps_root) + eps),
        mu_hat, nu_hat, is_leaf=lambda x: x is None)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, ScaleByClippedAdamState(count=count_inc, mu=mu, nu=nu, clip=clip_state)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None, *,
         nesterov: bool = False, clip: Optional[float] = None,
         clip_update: Optional[float] = None) -> optax.GradientTransformation:
  """Adam with coordinate-wise clipping of the first moment (Algorithm 6, Figure 5).

    ĝ_t = clip(g_t);  m_t = β₁m + (1 - β₁)ĝ_t;  v_t = β₂v + (1 - β₂)g_t²  (raw gradient);
    u_t = m̂_t / (sqrt(v̂_t + ε_root) + ε) with bias corrections m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ);
    u_t ← clip_update(u_t);  x_t = x_{t-1} - η u_t

  The paper's algorithm box omits the bias correction; this is standard Adam exactly as
  `optax.adam` computes it, with the same arguments and defaults; it equals `optax.adam` for
  any of them when ``clip`` and ``clip_update`` are None.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in `optax.adam`.
    clip: fraction of gradient coordinates clipped before the first moment (paper: 0.5).
    clip_update: fraction of coordinates of the final direction u_t to clip (paper: 0.5).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, optclip
    >>> tx = optclip.adam(0.1, clip=1.0)
    >>> updates, state = tx.update(jnp.array([4., 1.]), tx.init(jnp.zeros(2)))
    >>> [round(float(u), 4) for u in updates]  # the clip cut 4 down to 1 in the numerator
    [-0.025, -0.1]
    >>> float(optax.tree_utils.tree_get(state, "threshold"))
    1.0

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 6; Kingma & Ba 2015.
  """
  clip_update = _optional_fraction(clip_update, "clip_update")
  return optax.chain(
      scale_by_clipped_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, clip=clip),
      *_maybe_clip(clip_update), optax.scale_by_learning_rate(learning_rate))


class ScaleByClippedAdafactorState(NamedTuple):
  count: chex.Array
  row: optax.Updates  # R_t for factored matrices (shape without the last axis), else a dummy
  col: optax.Updates  # C_t for factored matrices (without the second-to-last axis), else a dummy
  v: optax.Updates  # V_t for vectors, scalars and unfactored leaves, else a dummy
  momentum: optax.Updates  # first moment of the update when `momentum` is set, else dummies
  clip: CoordClipState | optax.EmptyState  # what the numerator's clip did at the last step


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_clipped_adafactor(
    *, clip: Optional[float] = None, decay_rate: float = 0.8, decay_offset: int = 0,
    eps: float = 1e-30, clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None, dtype_momentum: Any = jnp.float32, factored: bool = True,
) -> optax.GradientTransformation:
  """Adafactor's direction Û_t (Algorithms 7 and 8), numerator clipped; no step size.

  For a leaf with two or more axes (a weight matrix; leading axes are batched, so a conv
  kernel HWIO is factored over its I and O axes), with β̂₂ₜ = 1 - (t + decay_offset)^(-decay_rate):

    R_t = β̂₂ₜ R + (1 - β̂₂ₜ) rowsum(G² + ε₁);  C_t = β̂₂ₜ C + (1 - β̂₂ₜ) colsum(G² + ε₁);
    V̂_t = R_t C_t / sum(R_t);  U_t = clip(G) / sqrt(V̂_t);  Û_t = U_t / max(1, RMS(U_t)/d)

  and for vectors and scalars (and every leaf with ``factored=False``)
  V̂_t = β̂₂ₜ V̂ + (1 - β̂₂ₜ)(G² + ε₁). The second moment always sees the raw gradient G.
  ``momentum`` (not in the paper's boxes) optionally averages Û_t. Argument names follow
  `optax.adafactor` where they mean the same: ``eps`` is ε₁, ``clipping_threshold`` is d
  (None: no update clipping).

  Args:
    clip: fraction of coordinates of G to clip in the numerator, or None.
    decay_rate, decay_offset: β̂₂ₜ's schedule.
    eps: ε₁.
    clipping_threshold: d, or None.
    momentum: an optional average of Û_t, or None (the paper's).
    dtype_momentum: its dtype.
    factored: factor the second moment of leaves with two or more axes.

  Returns:
    An `optax.GradientTransformation` (state `ScaleByClippedAdafactorState`).

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.scale_by_clipped_adafactor()
    >>> u, _ = tx.update({"b": jnp.array([2., -2.])}, tx.init({"b": jnp.zeros(2)}))
    >>> u["b"]  # the first step: G / sqrt(G² + ε₁), then RMS-clipped at d = 1
    Array([ 1., -1.], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithms 7-8; Shazeer & Stern 2018 (arXiv
    1804.04235).
  """
  clip = _optional_fraction(clip, "clip")

  def is_factored(p):
    return factored and jnp.ndim(p) >= 2

  def init_fn(params):
    def row(p):
      return jnp.zeros(p.shape[:-1], p.dtype) if is_factored(p) else jnp.zeros((1,), p.dtype)

    def col(p):
      return (jnp.zeros(p.shape[:-2] + p.shape[-1:], p.dtype) if is_factored(p)
              else jnp.zeros((1,), p.dtype))

    def v(p):
      return jnp.zeros((1,), p.dtype) if is_factored(p) else jnp.zeros_like(p)

    first = (optax.tree.zeros_like(params, dtype=dtype_momentum) if momentum is not None
             else jax.tree.map(lambda p: jnp.zeros((1,), p.dtype), params))
    return ScaleByClippedAdafactorState(
        count=jnp.zeros([], jnp.int32), row=jax.tree.map(row, params),
        col=jax.tree.map(col, params), v=jax.tree.map(v, params), momentum=first,
        clip=_clip_state(params, clip))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = (count + decay_offset).astype(jnp.float32)
    beta = 1.0 - t ** (-decay_rate)
    numerators, clip_state = _clip(updates, clip, state.clip)

    def leaf(g, g_hat, row, col, v):
      sq = jnp.square(g) + eps
      if is_factored(g):
        row = beta * row + (1 - beta) * jnp.sum(sq, axis=-1)
        col = beta * col + (1 - beta) * jnp.sum(sq, axis=-2)
        # R/sum(R) first: multiplying two ~ε₁-sized factors first underflows to 0 in float32
        # (0/0 = NaN where a block of the gradient is exactly zero, e.g. conv taps that only
        # see padding).
        v_hat = (_sharded_as_axes(row / jnp.sum(row, axis=-1, keepdims=True), g, -1)
                 [..., :, None] * _sharded_as_axes(col, g, -2)[..., None, :])
      else:
        v = beta * v + (1 - beta) * sq
        v_hat = v
      u = g_hat / jnp.sqrt(v_hat)
      if clipping_threshold is not None:
        u = u / jnp.maximum(1.0, _rms(u) / clipping_threshold)
      return u.astype(g.dtype), row, col, v

    # The row and column statistics are sums over a split axis, which would move a
    # replicated statistic onto that axis: every output goes back where its input was.
    results = jax.tree.map(
        lambda g, g_hat, row, col, v: tuple(
            placed_like(new, old) for new, old in zip(leaf(g, g_hat, row, col, v),
                                                       (g, row, col, v))),
        updates, numerators, state.row, state.col, state.v)
    pick = lambda i: jax.tree.map(lambda r: r[i], results,
                                  is_leaf=lambda x: isinstance(x, tuple))
    directions = pick(0)
    first = state.momentum
    if momentum is not None:
      first = optax.tree.update_moment(directions, state.momentum, momentum, 1)
      directions = optax.tree.cast_like(first, directions)
      first = optax.tree.cast(first, dtype_momentum)
    return directions, ScaleByClippedAdafactorState(
        count=count, row=pick(1), col=pick(2), v=pick(3), momentum=first, clip=clip_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _adafactor_step_size(learning_rate, eps2: float, multiply_by_parameter_scale: bool
                         ) -> optax.GradientTransformation:
  """Multiplies updates by -α_t = -ρ_t · max(ε₂, RMS(x_{t-1})) per leaf (the scale only with
  ``multiply_by_parameter_scale``), where ρ_t is the learning rate (a float or a schedule of
  the step count) or, for ``learning_rate=None``, the relative step min(10⁻², 1/sqrt(t))."""
  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if multiply_by_parameter_scale and params is None:
      raise ValueError("adafactor scales its step by the parameters' RMS and needs `params` "
                       "in update() (or pass multiply_by_parameter_scale=False)")
    count = optax.safe_increment(state.count)
    if learning_rate is None:
      rho = jnp.minimum(1e-2, 1.0 / jnp.sqrt(count.astype(jnp.float32)))
    elif callable(learning_rate):
      rho = learning_rate(state.count)
    else:
      rho = learning_rate
    if multiply_by_parameter_scale:
      updates = jax.tree.map(
          lambda u, p: (-jnp.maximum(eps2, _rms(p)) * rho * u).astype(u.dtype), updates, params)
    else:
      updates = jax.tree.map(lambda u: (-rho * u).astype(u.dtype), updates)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def _sharded_as_axes(factor, g, dropped: int):
  """A row (``dropped=-1``) or column (``-2``) statistic placed as ``g`` is along the axes
  it keeps, so that their outer product is placed as ``g`` (under an explicit-sharding mesh
  two factors split over the same mesh axis cannot be multiplied out)."""
  spec = explicit_spec(g)
  if spec is None:
    return factor
  spec = tuple(spec) + (None,) * (jnp.ndim(g) - len(spec))
  kept = spec[:dropped] + (spec[dropped + 1:] if dropped != -1 else ())
  return jax.sharding.reshard(factor, jax.sharding.PartitionSpec(*kept))


def adafactor(learning_rate: Optional[ScalarOrSchedule] = None, *,
              clip: Optional[float] = None, decay_rate: float = 0.8, decay_offset: int = 0,
              clipping_threshold: Optional[float] = 1.0, momentum: Optional[float] = None,
              dtype_momentum: Any = jnp.float32, eps: float = 1e-30, factored: bool = True,
              weight_decay_rate: Optional[float] = None, weight_decay_mask: Any = None,
              eps2: float = 1e-3, multiply_by_parameter_scale: bool = True
              ) -> optax.GradientTransformation:
  """Adafactor with coordinate-wise clipping of the numerator (Algorithms 7 and 8).

    x_t = x_{t-1} - α_t Û_t   (Û_t from `scale_by_clipped_adafactor`),
    α_t = ρ_t · max(ε₂, RMS(x_{t-1}))

  per leaf, with the paper's relative step ρ_t = min(10⁻², 1/sqrt(t)) when ``learning_rate``
  is None and ρ_t = learning_rate otherwise (the paper's "fixed learning rate in place of
  α_t", Appendix B.2). A fixed rate is still multiplied by max(ε₂, RMS(x_{t-1})), as the
  paper's code does (``torch_optimizer/adafactor.py``: ``scale_parameter=True``) and as
  `optax.adafactor` does (``multiply_by_parameter_scale=True``); pass
  ``multiply_by_parameter_scale=False`` for α_t = ρ_t. Constants default to the paper's:
  β̂₂ₜ = 1 - t^-0.8,
  ε₁ = 1e-30, ε₂ = 1e-3, d = 1; every matrix (leaf with 2+ axes, factored over the last two)
  keeps row and column statistics, vectors a full second moment. Arguments that mean the
  same as `optax.adafactor`'s carry its names (``decay_rate``, ``decay_offset``,
  ``clipping_threshold``, ``momentum``, ``dtype_momentum``, ``eps`` = ε₁, ``factored``,
  ``weight_decay_rate``, ``weight_decay_mask``, ``multiply_by_parameter_scale``); optax
  factors only axes of 128 or more, the paper factors every matrix.

  Args:
    learning_rate: None for relative step sizes, or η (a float or an `optax.Schedule`).
    clip: fraction of gradient coordinates clipped in the numerator (paper: 0.5), or None.
    decay_rate, decay_offset, clipping_threshold, eps, factored: see above.
    momentum, dtype_momentum: optional β₁ on the update and its accumulator's dtype (the
      paper's boxes have none).
    weight_decay_rate, weight_decay_mask: decoupled weight decay, as in `optax.adafactor`
      (added after the step size).
    eps2: ε₂ of the parameter scale.
    multiply_by_parameter_scale: multiply the step by max(ε₂, RMS(x_{t-1})) (then `update`
      needs ``params``).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.adafactor(1e-2)  # the step: 1e-2 · max(1e-3, RMS(x)) = 1e-2 at x = (1, 1)
    >>> params = jnp.ones(2)
    >>> updates, _ = tx.update(jnp.array([4., -1.]), tx.init(params), params)
    >>> updates
    Array([-0.01,  0.01], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithms 7-8; Shazeer & Stern 2018.
  """
  direction = scale_by_clipped_adafactor(
      clip=clip, decay_rate=decay_rate, decay_offset=decay_offset, eps=eps,
      clipping_threshold=clipping_threshold, momentum=momentum, dtype_momentum=dtype_momentum,
      factored=factored)
  step = _adafactor_step_size(learning_rate, eps2, multiply_by_parameter_scale)
  decay = ([] if weight_decay_rate is None else
           [optax.add_decayed_weights(-weight_decay_rate, weight_decay_mask)])
  return optax.chain(direction, step, *decay)


class ScaleByClippedLionState(NamedTuple):
  count: chex.Array
  mu: optax.Updates
  clip: CoordClipState | optax.EmptyState  # the gradient's clip at the last step
  clip_update: CoordClipState | optax.EmptyState  # the interpolation's clip at the last step


def scale_by_clipped_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: Optional[Any] = None,
                          *, clip: Optional[float] = None, clip_update: Optional[float] = None
                          ) -> optax.GradientTransformation:
  """Lion's direction (Algorithm 9) with clipping of the gradient or of the update.

    ĝ = clip(g);  c = β₁m + (1 - β₁)ĝ;  u = sgn(c)  or, with clip_update, u = clip(c)/τ_c;
    m ← β₂m + (1 - β₂)ĝ

  Clipping a sign vector would do nothing, so the paper's "clip update" variant replaces the
  sign by coordinate-wise clipping of c at the top-``clip_update`` threshold τ_c, divided by
  τ_c: coordinates at or above τ_c become ±1 as with the sign, smaller ones keep their
  relative size (with clip_update=1 this is the sign again). With both None this is
  `optax.scale_by_lion`, state included.

  Args:
    b1, b2, mu_dtype: as `optax.scale_by_lion`.
    clip: fraction of coordinates of g to clip, or None.
    clip_update: fraction of coordinates of c to clip in place of the sign, or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.scale_by_clipped_lion(clip_update=0.5)
    >>> tx.update(jnp.array([4., 1.]), tx.init(jnp.zeros(2)))[0]  # c = 0.1 g, τ_c = 0.4
    Array([1.  , 0.25], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 9 and Section 4.1.
  """
  clip = _optional_fraction(clip, "clip")
  clip_update = _optional_fraction(clip_update, "clip_update")
  if clip is None and clip_update is None:
    return optax.scale_by_lion(b1, b2, mu_dtype)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return ScaleByClippedLionState(
        count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        clip=_clip_state(params, clip), clip_update=_clip_state(params, clip_update))

  def update_fn(updates, state, params=None):
    del params
    grads, clip_state = _clip(updates, clip, state.clip)
    interp = jax.tree.map(lambda g, m: (1.0 - b1) * g + b1 * m, grads, state.mu)
    update_state = state.clip_update
    if clip_update is None:
      directions = jax.tree.map(jnp.sign, interp)
    else:
      clipped, update_state = clip_with_state(interp, clip_update, state.clip_update)
      tau = update_state.threshold
      directions = jax.tree.map(
          lambda c: jnp.where(tau > 0, c / jnp.maximum(tau, jnp.finfo(c.dtype).tiny),
                              jnp.sign(c)).astype(c.dtype), clipped)
    mu = optax.tree.cast(optax.tree.update_moment(grads, state.mu, b2, 1), mu_dtype)
    return directions, ScaleByClippedLionState(
        count=optax.safe_increment(state.count), mu=mu, clip=clip_state,
        clip_update=update_state)

  return optax.GradientTransformation(init_fn, update_fn)


def lion(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
         mu_dtype: Optional[Any] = None, weight_decay: ScalarOrSchedule = 1e-3,
         mask: Any = None, *, clip: Optional[float] = None,
         clip_update: Optional[float] = None) -> optax.GradientTransformation:
  """Lion with optional coordinate-wise clipping (Algorithm 9).

    ĝ_t = clip(g_t);  u_t = sgn(β₁m + (1 - β₁)ĝ_t);  m_t = β₂m + (1 - β₂)ĝ_t;
    x_t = x_{t-1} - η (u_t + λ x_{t-1})

  ``clip`` clips the gradient before both interpolations; ``clip_update`` is the "clip update"
  variant described in `scale_by_clipped_lion`. The arguments and defaults are
  `optax.lion`'s (weight decay λ = 1e-3, applied where ``mask`` says; `update` then needs
  ``params``), which this equals for any of them when both clips are None. Algorithm 9 has no
  weight decay: pass ``weight_decay=0`` for the paper's Lion.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    b1, b2, mu_dtype, weight_decay, mask: as in `optax.lion`.
    clip: fraction of gradient coordinates to clip, or None.
    clip_update: fraction for the clip-update variant (paper: 0.5), or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.lion(0.1, weight_decay=0.0)
    >>> updates, _ = tx.update(jnp.array([4., -1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.1,  0.1], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 9; Chen et al. 2023.
  """
  # A constant zero decay is left out, so that the paper's Lion needs no params in update().
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  return optax.chain(
      scale_by_clipped_lion(b1, b2, mu_dtype, clip=clip, clip_update=clip_update),
      *([] if no_decay else [optax.add_decayed_weights(weight_decay, mask)]),
      optax.scale_by_learning_rate(learning_rate))
