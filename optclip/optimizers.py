"""The optimizer family of Pan & Li (2023), Algorithms 3-9, with coordinate-wise clipping.

Every optimizer returns an `optax.GradientTransformation` whose updates are already multiplied
by -learning_rate, as optax's own aliases do, and accepts an `optax.Schedule` as learning rate.

``clip`` clips the gradient coordinate-wise (`optclip.coord_clip`) before it enters the
*numerator* of the update (the first moment). Adaptive methods keep feeding the raw gradient
into their second moment: "the clipped gradient is only used in the first order momentum"
(Figure 5), since clipping both would cancel the clipping in the ratio. ``clip_update`` clips
the final update direction instead (Section 4.2, Appendix B.2). With both ``None`` every
optimizer is its unclipped algorithm; `adam` and `lion` then equal `optax.adam`/`optax.lion`.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204), Appendix B.2.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from optclip.clipping import _threshold, clip_to_threshold, coord_clip, validate_fraction

__all__ = [
    "adafactor",
    "adam",
    "lion",
    "normalized_sgd",
    "scale_by_clipped_adafactor",
    "scale_by_clipped_adam",
    "scale_by_clipped_lion",
    "scale_by_frobenius_normalization",
    "sgd",
    "sign_sgd",
]

ScalarOrSchedule = optax.ScalarOrSchedule


def _optional_fraction(value, name):
  return None if value is None else validate_fraction(value, name)


def _clip(tree, fraction):
  """ĝ = clip(g) at the top-``fraction`` threshold (already validated); identity for None."""
  if fraction is None:
    return tree
  return clip_to_threshold(tree, _threshold(tree, fraction, False))


def _maybe(fraction) -> list:
  return [] if fraction is None else [coord_clip(fraction)]


def _momentum(momentum: float) -> optax.GradientTransformation:
  # m ← βm + (1 - β)ĝ, the paper's (1 - β)-damped momentum (optax.trace would omit 1 - β).
  return optax.ema(momentum, debias=False)


def sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.9,
        clip: Optional[float] = None) -> optax.GradientTransformation:
  """SGD with momentum and optional coordinate-wise clipping (Algorithm 3).

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - β) ĝ_t;  x_t = x_{t-1} - η m_t

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    momentum: β.
    clip: fraction of coordinates to clip (the paper uses 0.1), or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.sgd(0.1, clip=1.0)  # clip=1: every coordinate clipped to min |g|
    >>> updates, _ = tx.update(jnp.array([4., 1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.01, -0.01], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 3.
  """
  clip = _optional_fraction(clip, "clip")
  return optax.chain(*_maybe(clip), _momentum(momentum),
                     optax.scale_by_learning_rate(learning_rate))


def scale_by_frobenius_normalization(eps: float = 0.0) -> optax.GradientTransformation:
  """Rescales every leaf M to M / ‖M‖_F · sqrt(size(M)) (Algorithm 4's v_t).

  Each leaf is one block: a weight matrix of shape (m, n) gets Frobenius norm sqrt(mn), i.e.
  unit RMS. Vectors (biases, norms) and higher-rank kernels are treated the same way, with
  their size in place of mn; a scalar becomes its sign. A zero leaf stays zero.
  """
  def update_fn(updates, state, params=None):
    del params

    def normalize(m):
      norm = jnp.sqrt(jnp.sum(jnp.square(m)))
      scale = jnp.sqrt(jnp.asarray(m.size, m.dtype)) / (norm + eps)
      return jnp.where(norm > 0, m * scale, jnp.zeros_like(m))

    return jax.tree.map(normalize, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def normalized_sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.9,
                   clip: Optional[float] = None) -> optax.GradientTransformation:
  """Normalized SGD with momentum, per weight matrix (Algorithm 4).

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - β) ĝ_t;  v_t = m_t / ‖m_t‖_F · sqrt(mn);
    x_t = x_{t-1} - η v_t

  applied to every leaf separately (see `scale_by_frobenius_normalization` for vectors and
  scalars). The threshold of ``clip`` is global over all leaves.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    momentum: β.
    clip: fraction of coordinates to clip (the paper uses 0.1), or None.

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
  return optax.chain(*_maybe(clip), _momentum(momentum), scale_by_frobenius_normalization(),
                     optax.scale_by_learning_rate(learning_rate))


def sign_sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.9,
             clip: Optional[float] = None) -> optax.GradientTransformation:
  """Sign SGD with momentum (Algorithm 5).

    ĝ_t = clip(g_t);  m_t = β m_{t-1} + (1 - β) ĝ_t;  x_t = x_{t-1} - η sgn(m_t)

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    momentum: β.
    clip: fraction of coordinates to clip, or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.sign_sgd(0.5)
    >>> updates, _ = tx.update(jnp.array([4., -1e-3]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.5,  0.5], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 5.
  """
  clip = _optional_fraction(clip, "clip")
  return optax.chain(*_maybe(clip), _momentum(momentum), optax.scale_by_sign(),
                     optax.scale_by_learning_rate(learning_rate))


class ScaleByClippedAdamState(NamedTuple):
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_clipped_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                          clip: Optional[float] = None) -> optax.GradientTransformation:
  """Adam's direction with the first moment fed the clipped gradient.

    ĝ = clip(g);  μ ← β₁μ + (1 - β₁)ĝ;  ν ← β₂ν + (1 - β₂)g²;
    u = (μ / (1 - β₁ᵗ)) / (sqrt(ν / (1 - β₂ᵗ)) + ε)

  With ``clip=None`` this is `optax.scale_by_adam` (same operations, same order).
  """
  clip = _optional_fraction(clip, "clip")

  def init_fn(params):
    mu = optax.tree.zeros_like(params)
    nu = optax.tree.zeros_like(params)
    return ScaleByClippedAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    del params
    numerator = _clip(updates, clip)
    mu = optax.tree.update_moment(numerator, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree.map(
        lambda m, v: None if m is None else m / (jnp.sqrt(v) + eps),
        mu_hat, nu_hat, is_leaf=lambda x: x is None)
    return updates, ScaleByClippedAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, clip: Optional[float] = None,
         clip_update: Optional[float] = None) -> optax.GradientTransformation:
  """Adam with coordinate-wise clipping of the first moment (Algorithm 6, Figure 5).

    ĝ_t = clip(g_t);  m_t = β₁m + (1 - β₁)ĝ_t;  v_t = β₂v + (1 - β₂)g_t²  (raw gradient);
    u_t = m̂_t / (sqrt(v̂_t) + ε) with bias corrections m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ);
    u_t ← clip_update(u_t);  x_t = x_{t-1} - η u_t

  The paper's algorithm box omits the bias correction; this is standard Adam exactly as
  `optax.adam` computes it, which it equals when ``clip`` and ``clip_update`` are None.

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    b1, b2, eps: Adam's constants.
    clip: fraction of gradient coordinates clipped before the first moment (paper: 0.5).
    clip_update: fraction of coordinates of the final direction u_t to clip (paper: 0.5).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.adam(0.1, clip=1.0)
    >>> updates, _ = tx.update(jnp.array([4., 1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.025, -0.1  ], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 6; Kingma & Ba 2015.
  """
  clip = _optional_fraction(clip, "clip")
  clip_update = _optional_fraction(clip_update, "clip_update")
  return optax.chain(scale_by_clipped_adam(b1, b2, eps, clip), *_maybe(clip_update),
                     optax.scale_by_learning_rate(learning_rate))


class ScaleByClippedAdafactorState(NamedTuple):
  count: chex.Array
  row: optax.Updates  # R_t for matrices (shape without the last axis), else a dummy
  col: optax.Updates  # C_t for matrices (shape without the second-to-last axis), else a dummy
  v: optax.Updates  # V_t for vectors and scalars, else a dummy
  momentum: optax.Updates  # first moment of the update when `momentum` is set, else dummies


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _factored(shape) -> bool:
  return len(shape) >= 2


def scale_by_clipped_adafactor(
    clip: Optional[float] = None, decay_rate: float = 0.8, eps1: float = 1e-30,
    clipping_threshold: float = 1.0, momentum: Optional[float] = None,
) -> optax.GradientTransformation:
  """Adafactor's direction Û_t (Algorithms 7 and 8), numerator clipped; no step size.

  For a leaf with two or more axes (a weight matrix; leading axes are batched), with
  β̂₂ₜ = 1 - t^(-decay_rate):

    R_t = β̂₂ₜ R + (1 - β̂₂ₜ) rowsum(G² + ε₁);  C_t = β̂₂ₜ C + (1 - β̂₂ₜ) colsum(G² + ε₁);
    V̂_t = R_t C_t / sum(R_t);  U_t = clip(G) / sqrt(V̂_t);  Û_t = U_t / max(1, RMS(U_t)/d)

  and for vectors and scalars V̂_t = β̂₂ₜ V̂ + (1 - β̂₂ₜ)(G² + ε₁). The second moment always sees
  the raw gradient G. ``momentum`` (not in the paper's boxes) optionally averages Û_t.
  """
  clip = _optional_fraction(clip, "clip")

  def init_fn(params):
    def row(p):
      return jnp.zeros(p.shape[:-1], p.dtype) if _factored(p.shape) else jnp.zeros((1,), p.dtype)

    def col(p):
      return (jnp.zeros(p.shape[:-2] + p.shape[-1:], p.dtype) if _factored(p.shape)
              else jnp.zeros((1,), p.dtype))

    def v(p):
      return jnp.zeros((1,), p.dtype) if _factored(p.shape) else jnp.zeros_like(p)

    first = (optax.tree.zeros_like(params) if momentum is not None
             else jax.tree.map(lambda p: jnp.zeros((1,), p.dtype), params))
    return ScaleByClippedAdafactorState(
        count=jnp.zeros([], jnp.int32), row=jax.tree.map(row, params),
        col=jax.tree.map(col, params), v=jax.tree.map(v, params), momentum=first)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    beta = 1.0 - t ** (-decay_rate)
    numerators = _clip(updates, clip)

    def leaf(g, g_hat, row, col, v):
      sq = jnp.square(g) + eps1
      if _factored(g.shape):
        row = beta * row + (1 - beta) * jnp.sum(sq, axis=-1)
        col = beta * col + (1 - beta) * jnp.sum(sq, axis=-2)
        # R/sum(R) first: multiplying two ~ε₁-sized factors first underflows to 0 in float32
        # (0/0 = NaN where a block of the gradient is exactly zero, e.g. conv taps that only
        # see padding).
        v_hat = ((row / jnp.sum(row, axis=-1, keepdims=True))[..., :, None]
                 * col[..., None, :])
      else:
        v = beta * v + (1 - beta) * sq
        v_hat = v
      u = g_hat / jnp.sqrt(v_hat)
      u = u / jnp.maximum(1.0, _rms(u) / clipping_threshold)
      return u.astype(g.dtype), row, col, v

    results = jax.tree.map(leaf, updates, numerators, state.row, state.col, state.v)
    pick = lambda i: jax.tree.map(lambda r: r[i], results,
                                  is_leaf=lambda x: isinstance(x, tuple))
    directions = pick(0)
    first = state.momentum
    if momentum is not None:
      first = optax.tree.update_moment(directions, state.momentum, momentum, 1)
      directions = first
    return directions, ScaleByClippedAdafactorState(
        count=count, row=pick(1), col=pick(2), v=pick(3), momentum=first)

  return optax.GradientTransformation(init_fn, update_fn)


def _relative_step_size(eps2: float = 1e-3) -> optax.GradientTransformation:
  """Multiplies updates by -α_t = -max(ε₂, RMS(x_{t-1})) · min(1e-2, 1/sqrt(t)) per leaf."""
  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adafactor with learning_rate=None (relative step sizes) needs "
                       "`params` in update()")
    count = optax.safe_increment(state.count)
    rho = jnp.minimum(1e-2, 1.0 / jnp.sqrt(count.astype(jnp.float32)))
    updates = jax.tree.map(
        lambda u, p: (-jnp.maximum(eps2, _rms(p)) * rho * u).astype(u.dtype), updates, params)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def adafactor(learning_rate: Optional[ScalarOrSchedule] = None, clip: Optional[float] = None,
              decay_rate: float = 0.8, eps1: float = 1e-30, eps2: float = 1e-3,
              clipping_threshold: float = 1.0, momentum: Optional[float] = None,
              ) -> optax.GradientTransformation:
  """Adafactor with coordinate-wise clipping of the numerator (Algorithms 7 and 8).

    x_t = x_{t-1} - α_t Û_t   (Û_t from `scale_by_clipped_adafactor`)

  with the paper's relative step α_t = max(ε₂, RMS(x_{t-1})) · min(10⁻², 1/sqrt(t)) when
  ``learning_rate`` is None, and α_t = learning_rate otherwise (the paper's "fixed learning
  rate in place of α_t", Appendix B.2). Constants default to the paper's: β̂₂ₜ = 1 - t^-0.8,
  ε₁ = 1e-30, ε₂ = 1e-3, d = 1; matrices (leaves with 2+ axes, factored over the last two)
  keep row and column statistics, vectors a full second moment.

  Args:
    learning_rate: None for relative step sizes (then `update` needs ``params``), or η.
    clip: fraction of gradient coordinates clipped in the numerator (paper: 0.5), or None.
    decay_rate, eps1, eps2, clipping_threshold: the constants above.
    momentum: optional β₁ on the update (the paper's boxes have none).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.adafactor(1e-2)
    >>> updates, _ = tx.update(jnp.array([4., -1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.01,  0.01], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithms 7-8; Shazeer & Stern 2018.
  """
  clip = _optional_fraction(clip, "clip")
  direction = scale_by_clipped_adafactor(clip, decay_rate, eps1, clipping_threshold, momentum)
  if learning_rate is None:
    return optax.chain(direction, _relative_step_size(eps2))
  return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))


class ScaleByClippedLionState(NamedTuple):
  count: chex.Array
  mu: optax.Updates


def scale_by_clipped_lion(b1: float = 0.9, b2: float = 0.99, clip: Optional[float] = None,
                          clip_update: Optional[float] = None
                          ) -> optax.GradientTransformation:
  """Lion's direction (Algorithm 9) with clipping of the gradient or of the update.

    ĝ = clip(g);  c = β₁m + (1 - β₁)ĝ;  u = sgn(c)  or, with clip_update, u = clip(c)/τ_c;
    m ← β₂m + (1 - β₂)ĝ

  Clipping a sign vector would do nothing, so the paper's "clip update" variant replaces the
  sign by coordinate-wise clipping of c at the top-``clip_update`` threshold τ_c, divided by
  τ_c: coordinates at or above τ_c become ±1 as with the sign, smaller ones keep their
  relative size (with clip_update=1 this is the sign again).
  """
  clip = _optional_fraction(clip, "clip")
  clip_update = _optional_fraction(clip_update, "clip_update")

  def init_fn(params):
    return ScaleByClippedLionState(count=jnp.zeros([], jnp.int32),
                                   mu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    grads = _clip(updates, clip)
    interp = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
    if clip_update is None:
      directions = jax.tree.map(jnp.sign, interp)
    else:
      tau = _threshold(interp, clip_update, False)
      directions = jax.tree.map(
          lambda c: jnp.where(tau > 0, c / jnp.maximum(tau, jnp.finfo(c.dtype).tiny),
                              jnp.sign(c)).astype(c.dtype),
          clip_to_threshold(interp, tau))
    mu = optax.tree.update_moment(grads, state.mu, b2, 1)
    return directions, ScaleByClippedLionState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def lion(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
         clip: Optional[float] = None, clip_update: Optional[float] = None
         ) -> optax.GradientTransformation:
  """Lion with optional coordinate-wise clipping (Algorithm 9).

    ĝ_t = clip(g_t);  u_t = sgn(β₁m + (1 - β₁)ĝ_t);  m_t = β₂m + (1 - β₂)ĝ_t;
    x_t = x_{t-1} - η u_t

  ``clip`` clips the gradient before both interpolations; ``clip_update`` is the "clip update"
  variant described in `scale_by_clipped_lion`. With both None this equals `optax.lion`
  (without weight decay).

  Args:
    learning_rate: η, a float or an `optax.Schedule`.
    b1, b2: Lion's interpolation constants.
    clip: fraction of gradient coordinates to clip, or None.
    clip_update: fraction for the clip-update variant (paper: 0.5), or None.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.lion(0.1)
    >>> updates, _ = tx.update(jnp.array([4., -1.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.1,  0.1], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Algorithm 9; Chen et al. 2023.
  """
  return optax.chain(scale_by_clipped_lion(b1, b2, clip, clip_update),
                     optax.scale_by_learning_rate(learning_rate))
