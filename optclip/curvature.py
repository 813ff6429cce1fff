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

from optclip import spectrum
from optclip.clipping import clip_threshold
from optclip.geometry import map_directions, tree_dot
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
    "hessian_vector_product",
    "r_med",
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

  Lanczos (matfree) on Hessian-vector products; see `optclip.spectrum.eigenpairs`.
  Needs unsharded parameters (matfree flattens its vectors).

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

  See `optclip.spectrum.trace` for the estimators. Needs unsharded parameters.

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

  See `optclip.spectrum.spectral_density`. Needs unsharded parameters.

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
      total = total + jnp.tensordot(masked, masked, axes=(flat_axes, flat_axes))
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
