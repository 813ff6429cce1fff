"""Curvature of a loss: eigenpairs, trace and spectral density of the Hessian and of the
Gauss-Newton matrix (on `matfree`, see `optclip.spectrum`), Gauss-Newton smoothness with
coordinate removal (Pan & Li 2023, Appendix D), the Hessian diagonal (exact entries or
Hutchinson with its standard error) and R_med (Jiang, Malik & Li 2023). All matrix-free:
Hessian- and Gauss-Newton-vector products and per-example gradients only.

    values, vectors = curvature.hessian_eigenpairs(loss_fn, params, k=5)
    estimate = curvature.hessian_trace(loss_fn, params)           # Hutch++, with its error
    nodes, weights = curvature.hessian_spectral_density(loss_fn, params)
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import optax

from optclip import blocks, spectrum
from optclip.clipping import clip_threshold
from optclip.geometry import map_directions, tree_dot
from optclip.optimizers import ScaleByClippedAdamState
from optclip.sharding import explicit_spec
from optclip.spectrum import TraceEstimate

__all__ = [
    "DiagonalEstimate",
    "GaussNewtonSmoothness",
    "TraceEstimate",
    "gauss_newton_eigenpairs",
    "gauss_newton_spectral_density",
    "gauss_newton_coordinate_removal",
    "gauss_newton_spectral_norm",
    "gauss_newton_trace",
    "gauss_newton_vector_product",
    "hessian_diagonal",
    "hessian_diagonal_entries",
    "hessian_diagonal_hutchinson",
    "hessian_eigenpairs",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_block_spectral_densities",
    "hessian_vector_product",
    "adam_preconditioner",
    "adam_stability_threshold",
    "preconditioned_top_eigenvalue",
    "r_med",
    "sgd_stability_threshold",
    "top_hessian_eigenvalue",
]


def hessian_vector_product(loss_fn: Callable, params, vector):
  """∇²f(x)·v by forward-over-reverse AD (a jvp of `jax.grad`).

  Args:
    loss_fn: params -> scalar loss f.
    params: the point x, a pytree.
    vector: v, a pytree like ``params``.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1.]) * x ** 2)
    >>> curvature.hessian_vector_product(loss, jnp.ones(2), jnp.array([1., 1.]))
    Array([6., 2.], dtype=float32)
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def gauss_newton_vector_product(outputs_fn: Callable, output_loss: Callable, params, vector):
  """G·v = Jᵀ ∇²ℓ(z) J v for f(x) = ℓ(outputs_fn(x)), z = outputs_fn(x), J its Jacobian.

  The generalised Gauss-Newton matrix drops the outputs' own curvature (positive
  semi-definite when ℓ is convex in z, as cross-entropy in the logits).

  Args:
    outputs_fn: params -> outputs z (the logits, say).
    output_loss: z -> scalar ℓ(z).
    params: the point x.
    vector: v, a pytree like ``params``.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> outputs = lambda x: jnp.array([x[0] * x[1], x[1]])     # J = [[x1, x0], [0, 1]]
    >>> loss = lambda z: 0.5 * jnp.sum(z ** 2)                  # ∇²ℓ = I
    >>> curvature.gauss_newton_vector_product(outputs, loss, jnp.array([1., 2.]),
    ...                                       jnp.array([1., 0.]))   # JᵀJ e₀
    Array([4., 2.], dtype=float32)
  """
  outputs, jacobian_v = jax.jvp(outputs_fn, (params,), (vector,))
  curvature_jv = jax.jvp(jax.grad(output_loss), (outputs,), (jacobian_v,))[1]
  return jax.vjp(outputs_fn, params)[1](curvature_jv)[0]


def hessian_eigenpairs(loss_fn: Callable, params, k: int, *, key=None,
                       num_matvecs: int | None = None):
  """The ``k`` largest eigenvalues of ∇²f(x), descending, and unit eigenvectors.

  Lanczos on Hessian-vector products, leaf by leaf (also on explicitly sharded
  parameters); see `optclip.spectrum.eigenpairs`.

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    k: how many eigenpairs, 1 <= k <= the number of parameters.
    key: PRNG key of the start vector (default key 0).
    num_matvecs: Hessian-vector products, at least k (default max(2k + 20, 30), at most
      the number of parameters).

  Raises:
    ValueError: where k or num_matvecs is out of range.

  Returns:
    ``(eigenvalues (k,), eigenvectors)``: a pytree like ``params`` with a leading axis k.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1., 2.]) * x ** 2)
    >>> values, vectors = curvature.hessian_eigenpairs(loss, jnp.ones(3), 2, num_matvecs=3)
    >>> [round(float(v), 3) for v in values]
    [6.0, 4.0]
  """
  return spectrum.eigenpairs(lambda v: hessian_vector_product(loss_fn, params, v), params,
                             k, key=key, num_matvecs=num_matvecs)


def hessian_trace(loss_fn: Callable, params, *, key=None, num_matvecs: int = 60,
                  method: str = "hutch++") -> TraceEstimate:
  """tr ∇²f(x) by Hutch++ (or "xtrace", "hutchinson"), with its standard error.

  See `optclip.spectrum.trace` for the estimators (Hutch++ and Hutchinson also on
  explicitly sharded parameters).

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    key: PRNG key of the random probes (default key 0).
    num_matvecs: Hessian-vector products in all (at least 4 for Hutch++ and XTrace, 2 for
      Hutchinson: fewer could not estimate the error).
    method: "hutch++", "xtrace" or "hutchinson".

  Returns:
    A `TraceEstimate` (``trace``, ``stderr``); ``stderr`` is 0 only where the estimate is
    exact (the probes span the whole space).

  Raises:
    ValueError: for an unknown method or too few products.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1., 2.]) * x ** 2)
    >>> estimate = curvature.hessian_trace(loss, jnp.ones(3), num_matvecs=6)
    >>> round(float(estimate.trace), 3)
    12.0
  """
  return spectrum.trace(lambda v: hessian_vector_product(loss_fn, params, v), params,
                        key=key, num_matvecs=num_matvecs, method=method)


def hessian_spectral_density(loss_fn: Callable, params, *, key=None, num_matvecs: int = 30,
                             num_samples: int = 8):
  """(nodes, weights) of ∇²f(x)'s eigenvalue density by stochastic Lanczos quadrature.

  See `optclip.spectrum.spectral_density` (leaf by leaf, also on sharded parameters).

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    key: PRNG key of the start vectors (default key 0).
    num_matvecs: Lanczos steps per sample (at most the number of parameters).
    num_samples: Gaussian start vectors averaged over.

  Returns:
    ``(nodes, weights)``: Ritz values and their quadrature weights, which sum to 1 (a
    discrete measure to smooth for a plot).

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1., 2.]) * x ** 2)
    >>> nodes, weights = curvature.hessian_spectral_density(loss, jnp.ones(3), num_matvecs=3)
    >>> round(float(weights.sum()), 3), round(float(nodes.max()), 3)
    (1.0, 6.0)
  """
  return spectrum.spectral_density(lambda v: hessian_vector_product(loss_fn, params, v),
                                   params, key=key, num_matvecs=num_matvecs,
                                   num_samples=num_samples)


def hessian_block_spectral_densities(loss_fn: Callable, params, labels=None, *,
                                     by: str = "kind", key=None, num_matvecs: int = 30,
                                     num_samples: int = 8) -> dict:
  """The SLQ density of every diagonal block H_bb of ∇²f(x) (Zhang et al. 2024).

  Blocks are sets of leaves: ``labels`` (a pytree of strings like ``params``) or
  `optclip.blocks.partition` ``(params, by=by)``. The Hessian is linearised once
  (`jax.linearize` of the gradient), so every block, sample and Lanczos step shares one
  forward and backward pass and pays only the linear map; see
  `optclip.spectrum.block_spectral_densities` for the rest (leaf by leaf, also on sharded
  parameters). Feed the result to `optclip.spectrum.js_distances` for their
  heterogeneity measure.

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    labels: the block of every leaf (default: `optclip.blocks.partition` with ``by``).
    by: the default partition's grouping, "kind", "layer" or "layer/kind".
    key: PRNG key of the start vectors (default key 0).
    num_matvecs: Lanczos steps per sample and block.
    num_samples: start vectors per block.

  Returns:
    ``{block: (nodes, weights)}``, each block's quadrature (weights summing to 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda p: jnp.sum(3 * p["a"] ** 2) + jnp.sum(p["b"] ** 2) + p["a"][0] * p["b"][0]
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> densities = curvature.hessian_block_spectral_densities(
    ...     loss, params, {"a": "a", "b": "b"}, num_matvecs=2, num_samples=1)
    >>> {name: round(float(nodes.max()), 3) for name, (nodes, _) in densities.items()}
    {'a': 6.0, 'b': 2.0}

  References:
    Zhang et al., Why Transformers Need Adam: A Hessian Perspective, 2024 (arXiv 2402.16788).
  """
  labels = blocks.partition(params, by=by) if labels is None else labels
  _, hessian_times = jax.linearize(jax.grad(loss_fn), params)
  return spectrum.block_spectral_densities(hessian_times, params, labels, key=key,
                                           num_matvecs=num_matvecs, num_samples=num_samples)


def adam_preconditioner(opt_state, *, b2: float = 0.999, eps: float = 1e-8,
                        eps_root: float = 0.0):
  """Adam's diagonal preconditioner P = √(v̂ + ε_root) + ε from a live optimizer state.

  Finds the one Adam state in ``opt_state`` (`optax.ScaleByAdamState` of `optax.adam` or
  any chain holding `optax.scale_by_adam`, or `optclip.ScaleByClippedAdamState` of
  `optclip.adam(clip=...)`) and bias-corrects its second moment with its step count:
  v̂ = ν / (1 - b2ᵗ). Pass the optimizer's own ``b2``, ``eps`` and ``eps_root``.

  Args:
    opt_state: an optimizer state holding exactly one Adam state.
    b2: the optimizer's second-moment decay.
    eps: the optimizer's ε (added outside the square root, as `optax.scale_by_adam`).
    eps_root: the optimizer's ε_root (added inside it).

  Returns:
    A pytree like the parameters: √(v̂ + ε_root) + ε.

  Raises:
    ValueError: where the state holds no, or several, Adam states, or one that has taken
      no step.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optclip import curvature
    >>> tx = optax.adam(0.1, b2=0.5, eps=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([3., -4.]), state)
    >>> curvature.adam_preconditioner(state, b2=0.5, eps=0.0)
    Array([3., 4.], dtype=float32)
  """
  kinds = (optax.ScaleByAdamState, ScaleByClippedAdamState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  if len(found) != 1:
    raise ValueError(f"opt_state: expected exactly one Adam state (optax.ScaleByAdamState or "
                     f"optclip.ScaleByClippedAdamState), found {len(found)}")
  adam = found[0]
  try:
    steps = int(adam.count)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    steps = None  # under jit: the caller's to ensure
  if steps is not None and steps < 1:
    raise ValueError("opt_state: Adam has taken no step yet (count 0), so it has no second "
                     "moment to precondition with")
  correction = 1 - jnp.asarray(b2, jnp.float32) ** adam.count
  return jax.tree.map(
      lambda nu: jnp.sqrt(nu / correction.astype(nu.dtype) + eps_root) + eps, adam.nu)


def preconditioned_top_eigenvalue(loss_fn: Callable, params, preconditioner, *,
                                  iters: int = 30, key=None) -> jax.Array:
  """λ_max(P⁻¹∇²f(x)) for a positive diagonal preconditioner P (Cohen et al. 2022).

  P⁻¹H is similar to the symmetric P^(-1/2) H P^(-1/2), whose top eigenvalue Lanczos finds
  (`optclip.spectrum.top_eigenvalue`, leaf by leaf, also on sharded parameters). With
  P = `adam_preconditioner` of Adam's live state this is the preconditioned sharpness
  whose stability threshold is `adam_stability_threshold`.

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    preconditioner: P's diagonal, a pytree like ``params`` of positive entries.
    iters: Lanczos steps.
    key: PRNG key of the start vector (default key 0).

  Returns:
    A scalar: the largest Ritz value of P^(-1/2) H P^(-1/2).

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1.]) * x ** 2)     # H = diag(6, 2)
    >>> p = jnp.array([6., 0.5])                                     # P⁻¹H = diag(1, 4)
    >>> round(float(curvature.preconditioned_top_eigenvalue(loss, jnp.ones(2), p, iters=2)), 4)
    4.0

  References:
    Cohen et al., Adaptive Gradient Methods at the Edge of Stability, 2022 (arXiv 2207.14484).
  """
  matvec = spectrum.preconditioned(lambda v: hessian_vector_product(loss_fn, params, v),
                                   preconditioner)
  return spectrum.top_eigenvalue(matvec, params, iters=iters, key=key)


def adam_stability_threshold(learning_rate: float, b1: float = 0.9) -> float:
  """(2 + 2β₁) / ((1 - β₁) η): where Adam's preconditioned sharpness λ_max(P⁻¹H) makes
  its update unstable on a quadratic with P frozen (Cohen et al. 2022, 38/η at β₁ = 0.9).

  Example:
    >>> from optclip import curvature
    >>> round(curvature.adam_stability_threshold(1e-3), 6)
    38000.0
  """
  return (2 + 2 * b1) / ((1 - b1) * learning_rate)


def sgd_stability_threshold(learning_rate: float, momentum: float = 0.0) -> float:
  """(2 + 2β) / η: where λ_max(H) makes heavy-ball SGD (`optax.sgd` with ``momentum`` β)
  unstable on a quadratic; 2/η without momentum (Cohen et al. 2021, 2022).

  Example:
    >>> from optclip import curvature
    >>> [round(curvature.sgd_stability_threshold(0.1, m), 6) for m in (0.0, 0.9)]
    [20.0, 38.0]
  """
  return (2 + 2 * momentum) / learning_rate


def gauss_newton_eigenpairs(outputs_fn: Callable, output_loss: Callable, params, k: int, *,
                            key=None, num_matvecs: int | None = None):
  """The ``k`` largest eigenpairs of the Gauss-Newton matrix G = Jᵀ∇²ℓJ.

  As `hessian_eigenpairs`, on `gauss_newton_vector_product`.

  Args:
    outputs_fn: params -> outputs z.
    output_loss: z -> scalar ℓ(z).
    params: the point x.
    k: how many eigenpairs.
    key: PRNG key of the start vector (default key 0).
    num_matvecs: Gauss-Newton-vector products (see `hessian_eigenpairs`).

  Returns:
    ``(eigenvalues (k,), eigenvectors)``, descending.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> outputs = lambda x: jnp.array([2. * x[0], x[1]])
    >>> loss = lambda z: 0.5 * jnp.sum(z ** 2)
    >>> values, _ = curvature.gauss_newton_eigenpairs(outputs, loss, jnp.ones(2), 1,
    ...                                              num_matvecs=2)
    >>> round(float(values[0]), 3)
    4.0
  """
  return spectrum.eigenpairs(
      lambda v: gauss_newton_vector_product(outputs_fn, output_loss, params, v), params, k,
      key=key, num_matvecs=num_matvecs)


def gauss_newton_trace(outputs_fn: Callable, output_loss: Callable, params, *, key=None,
                       num_matvecs: int = 60, method: str = "hutch++") -> TraceEstimate:
  """tr G of the Gauss-Newton matrix G = Jᵀ∇²ℓJ, with its standard error.

  As `hessian_trace`, on `gauss_newton_vector_product`.

  Args:
    outputs_fn: params -> outputs z.
    output_loss: z -> scalar ℓ(z).
    params: the point x.
    key: PRNG key of the probes (default key 0).
    num_matvecs: products in all (see `hessian_trace`).
    method: "hutch++", "xtrace" or "hutchinson".

  Returns:
    A `TraceEstimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> outputs = lambda x: jnp.array([2. * x[0], x[1]])
    >>> loss = lambda z: 0.5 * jnp.sum(z ** 2)
    >>> round(float(curvature.gauss_newton_trace(outputs, loss, jnp.ones(2),
    ...                                          num_matvecs=4).trace), 3)
    5.0
  """
  return spectrum.trace(
      lambda v: gauss_newton_vector_product(outputs_fn, output_loss, params, v), params,
      key=key, num_matvecs=num_matvecs, method=method)


def gauss_newton_spectral_density(outputs_fn: Callable, output_loss: Callable, params, *,
                                  key=None, num_matvecs: int = 30, num_samples: int = 8):
  """(nodes, weights) of the Gauss-Newton matrix's eigenvalue density (SLQ).

  As `hessian_spectral_density`, on `gauss_newton_vector_product`.

  Args:
    outputs_fn: params -> outputs z.
    output_loss: z -> scalar ℓ(z).
    params: the point x.
    key: PRNG key of the start vectors (default key 0).
    num_matvecs: Lanczos steps per sample.
    num_samples: start vectors averaged over.

  Returns:
    ``(nodes, weights)``; the weights sum to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> outputs = lambda x: jnp.array([2. * x[0], x[1]])
    >>> loss = lambda z: 0.5 * jnp.sum(z ** 2)
    >>> nodes, weights = curvature.gauss_newton_spectral_density(outputs, loss, jnp.ones(2),
    ...                                                          num_matvecs=2)
    >>> round(float(nodes.max()), 3)
    4.0
  """
  return spectrum.spectral_density(
      lambda v: gauss_newton_vector_product(outputs_fn, output_loss, params, v), params,
      key=key, num_matvecs=num_matvecs, num_samples=num_samples)


class GaussNewtonSmoothness(NamedTuple):
  """Appendix D / Table 8: L = ‖G‖₂, ℓ after removing a fraction ε of the coordinates."""
  spectral_norm: jax.Array  # L
  reduced_spectral_norm: jax.Array  # ℓ
  ratio: jax.Array  # L / ℓ
  fraction_removed: jax.Array  # ε
  removed_per_leaf: object  # a pytree like the parameters: coordinates removed per leaf


def gauss_newton_spectral_norm(per_example_grads_fn: Callable, params, batch, *,
                               remove_ratio: float = 4.0) -> GaussNewtonSmoothness:
  """Spectral norm of the Gauss-Newton matrix G = Σᵢ gᵢgᵢᵀ, before and after coordinate removal.

  For a binary classifier with logits z, the loss Hessian in logit space has rank one, so the
  Gauss-Newton matrix is Σᵢ gᵢgᵢᵀ with gᵢ = sqrt(pᵢ₁pᵢ₂)·∇θ(zᵢ₁ - zᵢ₂) (Appendix D.2), i.e.
  G = AᵀA for the B×d matrix A whose rows are the gᵢ. Then ‖G‖₂ = λ_max(AAᵀ), a B×B
  eigenproblem: no d×d matrix is ever formed. The "row norm" of coordinate j is the norm of
  column j of A (row j of the square root Aᵀ); coordinates whose row norm is at least
  ``remove_ratio`` × the mean row norm are removed and ℓ = λ_max of the rest.

  Args:
    per_example_grads_fn: (params, batch) -> pytree like params with a leading axis B, the gᵢ.
    params: the point.
    batch: passed to per_example_grads_fn.
    remove_ratio: the paper's 4.

  Returns:
    `GaussNewtonSmoothness` (L, ℓ, L/ℓ, ε, and how many coordinates each leaf lost).

  References:
    Pan & Li 2023, arXiv 2306.00204, Appendix D and Table 8.
  """
  return gauss_newton_coordinate_removal(per_example_grads_fn(params, batch), remove_ratio)


def _replicated_if_sharded(x):
  """``out_sharding`` for a reduction of ``x`` to a small result: replicated where ``x`` is
  split by an explicit-sharding mesh (which then cannot infer it), else XLA's default."""
  return jax.sharding.PartitionSpec() if explicit_spec(x) is not None else None


def gauss_newton_coordinate_removal(rows, remove_ratio: float = 4.0) -> GaussNewtonSmoothness:
  """`gauss_newton_spectral_norm` from the rows gᵢ themselves, so that several removal
  ratios share one computation of them.

  Args:
    rows: the gᵢ, a pytree with a leading axis B on every leaf (as
      ``per_example_grads_fn`` of `gauss_newton_spectral_norm` returns them).
    remove_ratio: coordinates whose row norm is at least this × the mean are removed.

  Returns:
    `GaussNewtonSmoothness`.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> rows = {"w": jnp.array([[10., 1., 1., 1.], [0., 1., 1., 1.]])}  # G = AᵀA
    >>> result = curvature.gauss_newton_coordinate_removal(rows, remove_ratio=2.0)
    >>> float(result.fraction_removed), round(float(result.reduced_spectral_norm), 3)
    (0.25, 6.0)
  """
  leaves, treedef = jax.tree.flatten(rows)

  def gram(mask_leaves):
    total = 0
    for leaf, mask in zip(leaves, mask_leaves):
      flat_axes = tuple(range(1, leaf.ndim))
      masked = leaf if mask is None else leaf * mask[None]
      # A B x B Gram matrix: replicated where the rows are sharded over what it sums.
      total = total + jnp.tensordot(masked, masked, axes=(flat_axes, flat_axes),
                                    out_sharding=_replicated_if_sharded(leaf))
    return total

  row_norms = [jnp.sqrt(jnp.sum(jnp.square(leaf), axis=0)) for leaf in leaves]
  count = sum(r.size for r in row_norms)
  mean = sum(jnp.sum(r) for r in row_norms) / count
  keep = [(r < remove_ratio * mean).astype(leaves[0].dtype) for r in row_norms]
  removed = 1.0 - sum(jnp.sum(k) for k in keep) / count
  full = jnp.linalg.eigvalsh(gram([None] * len(leaves)))[-1]
  reduced = jnp.linalg.eigvalsh(gram(keep))[-1]
  per_leaf = jax.tree.unflatten(treedef, [jnp.sum(k == 0).astype(jnp.int32) for k in keep])
  return GaussNewtonSmoothness(full, reduced, full / reduced, removed, per_leaf)


def top_hessian_eigenvalue(loss_fn: Callable, params, *, iters: int = 30,
                           key: jax.Array | None = None) -> jax.Array:
  """Largest (algebraic) eigenvalue of ∇²f(x) by Lanczos with full reorthogonalization,
  leaf by leaf (also on explicitly sharded parameters; see `optclip.spectrum.top_eigenvalue`).

  Uses ``iters`` Hessian-vector products (at most the number of parameters) and keeps as
  many vectors shaped like params.

  Args:
    loss_fn: params -> scalar.
    params: the point.
    iters: Lanczos steps, a positive integer.
    key: PRNG key for the start vector (default key 0).

  Returns:
    A scalar, the largest Ritz value (a lower bound of λ_max that converges from below).

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1., 2.]) * x ** 2)
    >>> round(float(curvature.top_hessian_eigenvalue(loss, jnp.ones(3), iters=10)), 4)
    6.0
  """
  return spectrum.top_eigenvalue(lambda v: hessian_vector_product(loss_fn, params, v),
                                 params, iters=iters, key=key)


class DiagonalEstimate(NamedTuple):
  """Hutchinson's estimate of diag ∇²f(x) and its standard error, pytrees like params."""
  mean: object
  stderr: object


def hessian_diagonal_hutchinson(loss_fn: Callable, params, *, key=None, samples: int = 100,
                                batch_size: int = 64) -> DiagonalEstimate:
  """diag ∇²f(x) ≈ mean over Rademacher z of z ⊙ Hz, with the standard error of that mean
  (the sample standard deviation / √samples), leaf by leaf (sharding-safe).

  Unbiased; the error of coordinate i is ≈ sqrt(Σ_{j≠i} H_ij² / samples), so entries much
  smaller than their row's off-diagonal mass need many samples.

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    key: PRNG key of the Rademacher probes (default key 0).
    samples: probes, at least 2 (for the standard error).
    batch_size: probes per Hessian-vector product call (vmapped).

  Returns:
    A `DiagonalEstimate` (``mean``, ``stderr``), each a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: jnp.sum(jnp.array([3., 1.]) * x ** 2)   # diagonal H: exact
    >>> curvature.hessian_diagonal_hutchinson(loss, jnp.ones(2), samples=4).mean
    Array([6., 2.], dtype=float32)
  """
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.key(0) if key is None else key

  def one(k):
    ks = jax.random.split(k, len(leaves))
    z = jax.tree.unflatten(treedef, [jax.random.rademacher(kk, jnp.shape(l), jnp.result_type(l))
                                     for kk, l in zip(ks, leaves)])
    return jax.tree.map(jnp.multiply, z, hessian_vector_product(loss_fn, params, z))

  estimates = map_directions(one, jax.random.split(key, samples), batch_size=batch_size)
  return DiagonalEstimate(
      jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates),
      jax.tree.map(lambda e: jnp.std(e, axis=0, ddof=1) / jnp.sqrt(samples), estimates))


def hessian_diagonal(loss_fn: Callable, params, *, method: str = "exact",
                     key: jax.Array | None = None, samples: int = 100,
                     batch_size: int = 64):
  """The diagonal of ∇²f(x) as a pytree shaped like params.

  ``method="exact"``: one Hessian-vector product per coordinate (with unit vectors, vmapped
  ``batch_size`` at a time) — exact, O(d) HVPs, for small models (`hessian_diagonal_entries`
  gives exact entries at chosen coordinates of any model). ``method="hutchinson"``: the mean
  of `hessian_diagonal_hutchinson` (which also gives its standard error).

  Args:
    loss_fn: params -> scalar loss.
    params: the point x.
    method: "exact" or "hutchinson".
    key: PRNG key of Hutchinson's probes.
    samples: Hutchinson's probes.
    batch_size: unit vectors (or probes) per vmapped Hessian-vector product.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda x: x[0] * x[1] + jnp.sum(jnp.array([3., 1.]) * x ** 2)
    >>> curvature.hessian_diagonal(loss, jnp.ones(2))
    Array([6., 2.], dtype=float32)
  """
  leaves, treedef = jax.tree.flatten(params)
  if method == "hutchinson":
    return hessian_diagonal_hutchinson(loss_fn, params, key=key, samples=samples,
                                       batch_size=batch_size).mean
  if method != "exact":
    raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
  diagonals = []
  for index, leaf in enumerate(leaves):
    size = int(jnp.size(leaf))

    def column(j, index=index, leaf=leaf):
      unit = [jnp.zeros_like(l) for l in leaves]
      unit[index] = jnp.zeros((size,), jnp.result_type(leaf)).at[j].set(1).reshape(
          jnp.shape(leaf))
      hv = hessian_vector_product(loss_fn, params, jax.tree.unflatten(treedef, unit))
      return jnp.ravel(jax.tree.leaves(hv)[index])[j]

    values = map_directions(column, jnp.arange(size), batch_size=batch_size)
    diagonals.append(values.reshape(jnp.shape(leaf)))
  return jax.tree.unflatten(treedef, diagonals)


def hessian_diagonal_entries(loss_fn: Callable, params, indices, *, batch_size: int = 32):
  """Exact diagonal entries H_ii of ∇²f(x) at chosen coordinates.

  Each entry is the second derivative of t ↦ f(x + t·e_i), by forward-over-forward AD
  (jvp of jvp along the unit vector e_i); ``batch_size`` entries are evaluated at a time,
  sharing the primal computation. One compiled program serves every leaf.

  Args:
    loss_fn: params -> scalar.
    params: the point x.
    indices: a pytree shaped like ``params`` whose leaves are int arrays of flat indices
      into the matching leaf (empty arrays allowed).
    batch_size: entries per vectorised batch.

  Returns:
    A pytree like ``indices`` with the entries H_ii (float32 at least) at those indices.

  Raises:
    ValueError: naming the leaf, for an index outside it.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> loss = lambda p: jnp.sum(jnp.array([1., 2., 3.]) * p["w"] ** 2)
    >>> curvature.hessian_diagonal_entries(loss, {"w": jnp.zeros(3)}, {"w": jnp.array([2, 0])})
    {'w': Array([6., 2.], dtype=float32)}
  """
  leaves, treedef = jax.tree.flatten(params)
  index_leaves = treedef.flatten_up_to(indices)
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, leaf, index in zip(paths, leaves, index_leaves):
    if isinstance(index, jax.core.Tracer) or not np.size(index):
      continue  # traced indices cannot be checked here: out of range, they read a 0
    index = np.asarray(index)
    if not np.issubdtype(index.dtype, np.integer):
      raise ValueError(f"indices{path}: expected integer flat indices, got {index.dtype}")
    if index.min() < 0 or index.max() >= np.size(leaf):
      raise ValueError(f"indices{path}: flat indices must lie in [0, {np.size(leaf)}) (the "
                       f"leaf has shape {np.shape(leaf)}), got {index.min()}..{index.max()}")
  leaf_of = jnp.concatenate([jnp.full((len(i),), n, jnp.int32)
                             for n, i in enumerate(index_leaves)] + [jnp.zeros((0,), jnp.int32)])
  flat_index = jnp.concatenate([jnp.asarray(i, jnp.int32).reshape(-1) for i in index_leaves]
                               + [jnp.zeros((0,), jnp.int32)])

  def entry(which):
    leaf, index = which
    unit = jax.tree.unflatten(treedef, [
        ((jnp.arange(jnp.size(l)) == index) & (leaf == n)).astype(jnp.result_type(l))
        .reshape(jnp.shape(l)) for n, l in enumerate(leaves)])
    first = lambda x: jax.jvp(loss_fn, (x,), (unit,))[1]
    return jax.jvp(first, (params,), (unit,))[1]

  if flat_index.shape[0] == 0:
    values = jnp.zeros((0,), jnp.float32)
  else:
    values = map_directions(entry, (leaf_of, flat_index), batch_size=batch_size)
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  sizes = np.cumsum([0] + [len(i) for i in index_leaves])
  return jax.tree.unflatten(treedef, [values[a:b] for a, b in zip(sizes[:-1], sizes[1:])])


def r_med(hessian_diag, *, per_leaf: bool = False):
  """R_med = max_i ``|H_ii|`` / median_i ``|H_ii|`` (Jiang, Malik & Li 2023).

  The statistic of seed 002 ("analogous to the condition number of the loss Hessian evaluated
  at the iterates"): the ratio of the largest to the median absolute diagonal entry of the
  Hessian. The median is the ⌈n/2⌉-th largest ``|H_ii|`` (exact, via `clip_threshold`), so for an
  even count it is the upper of the two middle values.

  Args:
    hessian_diag: the Hessian diagonal as a pytree (e.g. from `hessian_diagonal`).
    per_leaf: one value per leaf (per layer) instead of one over all parameters.

  Returns:
    A scalar, or with ``per_leaf`` a pytree of scalars like ``hessian_diag``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import curvature
    >>> float(curvature.r_med({"a": jnp.array([1., 2., 8.]), "b": jnp.array([-4.])}))
    2.0
  """
  if per_leaf:
    return jax.tree.map(lambda d: r_med(d), hessian_diag)
  # jnp.maximum, not Python's max: the leaves may be tracers under jit
  largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(d)) for d in jax.tree.leaves(hessian_diag)])
  return largest / clip_threshold(hessian_diag, 0.5)
