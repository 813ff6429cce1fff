"""Matrix-free spectra of curvature operators on top of `matfree` (Lanczos, stochastic
Lanczos quadrature, stochastic trace estimation): the top-k eigenpairs, the trace and the
spectral density of any symmetric operator given as ``matvec(v) -> same pytree as v``.

`optclip.curvature` applies these to the Hessian and the Gauss-Newton matrix. matfree
flattens its pytrees (``ravel_pytree``), so these need unsharded parameters; under an
explicit-sharding mesh that concatenation raises, and `curvature.top_hessian_eigenvalue`
(Lanczos leaf by leaf) is the sharded path.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from matfree import decomp, eig, stochtrace

from optclip.sharding import explicit_spec

__all__ = ["TraceEstimate", "eigenpairs", "spectral_density", "trace"]


def _unsharded(like, what: str):
  if any(explicit_spec(x) is not None for x in jax.tree.leaves(like)):
    raise ValueError(f"{what}: matfree flattens the parameters, which explicit sharding "
                     "forbids; use optclip.curvature.top_hessian_eigenvalue (leaf by leaf) "
                     "on sharded parameters")


def _normal_like(key, like):
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
                                      for k, l in zip(keys, leaves)])


def _size(like) -> int:
  return int(sum(jnp.size(x) for x in jax.tree.leaves(like)))


def eigenpairs(matvec: Callable, like, k: int, *, key=None, num_matvecs: int | None = None):
  """The ``k`` largest eigenvalues (descending) and unit eigenvectors of a symmetric operator.

  Lanczos with full reorthogonalisation (`matfree.decomp.tridiag_sym` and
  `matfree.eig.eigh_partial`) from a Gaussian start, ``num_matvecs`` products (default
  max(2k + 20, 30), at most the dimension): the extreme Ritz pairs converge first.

  Returns:
    ``(eigenvalues (k,), eigenvectors)``, the latter a pytree like ``like`` with a leading
    axis of size k.
  """
  _unsharded(like, "eigenpairs")
  n = _size(like)
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}], got {k}")
  num = min(n, num_matvecs or max(2 * k + 20, 30))
  start = _normal_like(jax.random.key(0) if key is None else key, like)
  values, vectors = eig.eigh_partial(decomp.tridiag_sym(num, reortho="full"))(matvec, start)
  order = jnp.argsort(values)[::-1][:k]
  return values[order], jax.tree.map(lambda v: v[order], vectors)


class TraceEstimate(NamedTuple):
  trace: jax.Array
  stderr: jax.Array  # the estimate's standard error (0 where computed exactly)


def trace(matvec: Callable, like, *, key=None, num_matvecs: int = 60,
          method: str = "hutch++") -> TraceEstimate:
  """tr(A) of a symmetric operator from ``num_matvecs`` products.

  ``method="hutch++"`` (Meyer et al. 2021): a third of the products sketch A's range
  (Q = orth(A S)), tr(QᵀAQ) is exact on it, and Hutchinson with the remaining products
  estimates the rest, tr((I - QQᵀ)A(I - QQᵀ)); its standard error is that part's.
  ``"xtrace"``: matfree's XTrace (Epperly et al. 2024), Hutch++'s exchangeable successor.
  ``"hutchinson"``: matfree's plain Monte Carlo estimator with Rademacher vectors.
  With at least the dimension of products, the trace is computed exactly.
  """
  _unsharded(like, "trace")
  flat, unravel = ravel_pytree(like)
  n = flat.shape[0]
  key = jax.random.key(0) if key is None else key
  apply = lambda v: ravel_pytree(matvec(unravel(v)))[0]
  if num_matvecs >= n:
    identity = jnp.eye(n, dtype=flat.dtype)
    return TraceEstimate(jnp.trace(jax.lax.map(apply, identity)), jnp.zeros(()))
  if method == "hutchinson":
    estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
        stochtrace.monte_carlo_trace(), stochtrace.sampler_signs(flat, num=num_matvecs))
    value, stderr = estimate(lambda v: apply(v), key)
    return TraceEstimate(value, stderr)
  if method == "xtrace":
    estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
        stochtrace.leave_one_out_xtrace(),
        stochtrace.sampler_normal(flat, num=max(2, num_matvecs // 2)))
    value, stderr = estimate(lambda v: apply(v), key)
    return TraceEstimate(value, stderr)
  if method != "hutch++":
    raise ValueError(f"method must be 'hutch++', 'xtrace' or 'hutchinson', got {method!r}")
  sketch = max(1, num_matvecs // 3)
  probes = max(1, num_matvecs - 2 * sketch)
  s_key, g_key = jax.random.split(key)
  signs = lambda k, m: jax.random.rademacher(k, (m, n), flat.dtype)
  q, _ = jnp.linalg.qr(jax.lax.map(apply, signs(s_key, sketch)).T)  # (n, sketch)
  exact = jnp.trace(q.T @ jax.lax.map(apply, q.T).T)
  g = signs(g_key, probes)
  residual = g - (g @ q) @ q.T  # (I - QQᵀ) g
  samples = jnp.sum(residual * jax.lax.map(apply, residual), axis=1)
  return TraceEstimate(exact + samples.mean(), samples.std(ddof=1) / jnp.sqrt(probes)
                       if probes > 1 else jnp.zeros(()))


def spectral_density(matvec: Callable, like, *, key=None, num_matvecs: int = 30,
                     num_samples: int = 8):
  """Stochastic Lanczos quadrature of a symmetric operator's eigenvalue density.

  For each of ``num_samples`` Gaussian vectors v, ``num_matvecs`` Lanczos steps
  (`matfree.decomp.tridiag_sym`) give a tridiagonal T; its eigenvalues θⱼ are quadrature
  nodes and the squared first components of its eigenvectors their weights, so that
  Σ weights · g(nodes) ≈ tr(g(A)) / n.

  Returns:
    ``(nodes, weights)``, both of shape (num_samples · num_matvecs,), weights summing to 1.
  """
  _unsharded(like, "spectral_density")
  flat, unravel = ravel_pytree(like)
  num = min(flat.shape[0], num_matvecs)
  tridiag = decomp.tridiag_sym(num, reortho="full")
  apply = lambda v: ravel_pytree(matvec(unravel(v)))[0]

  def one(k):
    v = jax.random.normal(k, flat.shape, flat.dtype)
    _, (diagonal, off_diagonal), *_ = _tridiagonal(tridiag, apply, v / jnp.linalg.norm(v))
    matrix = jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    nodes, vectors = jnp.linalg.eigh(matrix)
    return nodes, vectors[0] ** 2

  keys = jax.random.split(jax.random.key(0) if key is None else key, num_samples)
  nodes, weights = jax.lax.map(one, keys)
  return nodes.reshape(-1), weights.reshape(-1) / num_samples


def _tridiagonal(tridiag, apply, start):
  """(Q, (diagonal, off-diagonal), ...) of matfree's tridiagonalisation."""
  basis, matrix, *rest = tridiag(apply, start)
  return basis, (jnp.diagonal(matrix), jnp.diagonal(matrix, 1)), rest
