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
import numpy as np
from jax.flatten_util import ravel_pytree
from matfree import decomp, eig, stochtrace

from optclip.sharding import explicit_spec

__all__ = ["TraceEstimate", "eigenpairs", "spectral_density", "top_eigenvalue", "trace"]


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


# The fewest products with which each estimator also estimates its standard error (two
# Monte Carlo samples at least; Hutch++ spends a third on its sketch, XTrace pairs them).
MINIMUM_MATVECS = {"hutch++": 4, "xtrace": 4, "hutchinson": 2}


def _positive_int(value, name: str) -> int:
  """``value`` as an int, refusing what is not a positive integer (naming ``name``)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _tree_dot(a, b):
  """⟨a, b⟩ leaf by leaf in float32 at least (``jnp.sum(a * b)``: sharding-safe)."""
  terms = [jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)) * y)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return sum(terms) if terms else jnp.zeros(())


def _like(value, leaf):
  """``value`` resharded like ``leaf`` where an explicit-sharding mesh splits ``leaf``."""
  spec = explicit_spec(leaf)
  return value if spec is None else jax.sharding.reshard(value, spec)


def _stacked_zeros(leaf, count: int):
  """Zeros of shape (count, *leaf.shape), sharded like ``leaf`` on its own axes."""
  spec = explicit_spec(leaf)
  zeros = jnp.zeros((count,) + jnp.shape(leaf), jnp.result_type(leaf))
  return zeros if spec is None else jax.sharding.reshard(
      zeros, jax.sharding.PartitionSpec(None, *spec))


def top_eigenvalue(matvec: Callable, like, *, iters: int = 30, key=None) -> jax.Array:
  """The largest (algebraic) eigenvalue of a symmetric operator by Lanczos with full
  reorthogonalisation, leaf by leaf.

  Unlike matfree (which ravels its pytrees), every vector here keeps the structure and the
  sharding of ``like``: the Krylov basis is stored per leaf with a leading axis, inner
  products are ``jnp.sum(a * b)`` per leaf, so the only communication beyond ``matvec``
  is a few scalars per leaf and step. ``iters`` is capped at the dimension; once the
  Krylov space is exhausted (breakdown: the residual vanishes), the remaining steps add
  copies of the first Rayleigh quotient, below the Ritz values already found, so the
  answer is that of the steps before (no division by a vanishing norm, no NaN).

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of arrays (shapes, dtypes and shardings of the vectors).
    iters: Lanczos steps, a positive integer.
    key: PRNG key for the start vector (default key 0).

  Returns:
    A scalar: the largest Ritz value, which approaches λ_max from below.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = {"x": jnp.diag(jnp.array([5., 1., 3.]))}
    >>> matvec = lambda v: {"x": a["x"] @ v["x"]}
    >>> round(float(spectrum.top_eigenvalue(matvec, {"x": jnp.zeros(3)}, iters=3)), 3)
    5.0
  """
  iters = min(_positive_int(iters, "iters"), _size(like))
  key = jax.random.key(0) if key is None else key
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  start = jax.tree.unflatten(treedef, [
      _like(jax.random.normal(k, jnp.shape(l), jnp.result_type(l)), l)
      for k, l in zip(keys, leaves)])
  start = jax.tree.map(lambda v: v / jnp.sqrt(_tree_dot(start, start)), start)
  basis = jax.tree.map(lambda v: _stacked_zeros(v, iters), start)
  scale = jnp.zeros(())

  def step(i, carry):
    basis, alphas, betas, v, v_prev, beta, scale, alive = carry
    basis = jax.tree.map(lambda b, x: b.at[i].set(x), basis, v)
    w = matvec(v)
    alpha = _tree_dot(w, v)
    w = jax.tree.map(lambda a, b, c: a - alpha * b - beta * c, w, v, v_prev)
    # Full reorthogonalization against the stored basis (rows beyond i are zero).
    # Products and sums, not tensordot: a contraction over a sharded axis raises under
    # explicit sharding, an elementwise product summed over it does not.
    coeffs = sum(jnp.sum(b * x[None], axis=tuple(range(1, b.ndim)))
                 for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
    w = jax.tree.map(
        lambda x, b: x - jnp.sum(coeffs.reshape((-1,) + (1,) * x.ndim) * b, axis=0).astype(
            x.dtype), w, basis)
    beta_next = jnp.sqrt(_tree_dot(w, w))
    scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
    # A residual at rounding level means the Krylov space is exhausted: stop there.
    broken = beta_next <= 1e-6 * jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
    alive_next = alive & ~broken
    alphas = alphas.at[i].set(jnp.where(alive, alpha, alphas[0]))
    betas = betas.at[i].set(jnp.where(alive_next, beta_next, 0.0))
    v_next = jax.tree.map(lambda x: jnp.where(alive_next, x / jnp.where(broken, 1.0, beta_next),
                                              jnp.zeros_like(x)), w)
    return (basis, alphas, betas, v_next, v, jnp.where(alive_next, beta_next, 0.0), scale,
            alive_next)

  zeros = jax.tree.map(jnp.zeros_like, start)
  carry = (basis, jnp.zeros((iters,)), jnp.zeros((iters,)), start, zeros, jnp.zeros(()),
           scale, jnp.asarray(True))
  _, alphas, betas, *_ = jax.lax.fori_loop(0, iters, step, carry)
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  return jnp.linalg.eigvalsh(tridiagonal)[-1]


def eigenpairs(matvec: Callable, like, k: int, *, key=None, num_matvecs: int | None = None):
  """The ``k`` largest eigenvalues (descending) and unit eigenvectors of a symmetric operator.

  Lanczos with full reorthogonalisation (`matfree.decomp.tridiag_sym` and
  `matfree.eig.eigh_partial`) from a Gaussian start, ``num_matvecs`` products (default
  max(2k + 20, 30), at most the dimension): the extreme Ritz pairs converge first.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of unsharded arrays (the shapes and dtypes of the vectors).
    k: how many pairs, 1 <= k <= the dimension.
    key: PRNG key of the start vector (default key 0).
    num_matvecs: products, at least k.

  Returns:
    ``(eigenvalues (k,), eigenvectors)``, the latter a pytree like ``like`` with a leading
    axis of size k.

  Raises:
    ValueError: for k or num_matvecs out of range, or sharded arrays in ``like``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> values, _ = spectrum.eigenpairs(lambda v: a @ v, jnp.zeros(3), 2, num_matvecs=3)
    >>> [round(float(v), 3) for v in values]
    [5.0, 3.0]
  """
  _unsharded(like, "eigenpairs")
  n = _size(like)
  k = _positive_int(k, "k")
  if k > n:
    raise ValueError(f"k must be in [1, {n}] (the dimension), got {k}")
  if num_matvecs is not None:
    num_matvecs = _positive_int(num_matvecs, "num_matvecs")
    if num_matvecs < k:
      raise ValueError(f"num_matvecs ({num_matvecs}) must be at least k ({k}): Lanczos with "
                       "m products has m Ritz pairs")
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

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of unsharded arrays.
    key: PRNG key of the probes (default key 0).
    num_matvecs: products in all (at least `MINIMUM_MATVECS` of the method, else the
      standard error could not be estimated).
    method: "hutch++", "xtrace" or "hutchinson".

  Returns:
    A `TraceEstimate` (``trace``, ``stderr``; ``stderr`` 0 only where exact).

  Raises:
    ValueError: for an unknown method or too few products.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> estimate = spectrum.trace(lambda v: a @ v, jnp.zeros(3), num_matvecs=3)
    >>> float(estimate.trace), float(estimate.stderr)
    (9.0, 0.0)
  """
  _unsharded(like, "trace")
  flat, unravel = ravel_pytree(like)
  n = flat.shape[0]
  num_matvecs = _positive_int(num_matvecs, "num_matvecs")
  if method not in MINIMUM_MATVECS:
    raise ValueError(f"method must be 'hutch++', 'xtrace' or 'hutchinson', got {method!r}")
  if num_matvecs < min(MINIMUM_MATVECS[method], n):
    raise ValueError(f"num_matvecs={num_matvecs} is too few for {method} to estimate its own "
                     f"error: at least {MINIMUM_MATVECS[method]} (or the dimension, {n}, for "
                     "the exact trace)")
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
  sketch = max(1, num_matvecs // 3)
  probes = max(1, num_matvecs - 2 * sketch)
  s_key, g_key = jax.random.split(key)
  signs = lambda k, m: jax.random.rademacher(k, (m, n), flat.dtype)
  q, _ = jnp.linalg.qr(jax.lax.map(apply, signs(s_key, sketch)).T)  # (n, sketch)
  exact = jnp.trace(q.T @ jax.lax.map(apply, q.T).T)
  g = signs(g_key, probes)
  residual = g - (g @ q) @ q.T  # (I - QQᵀ) g
  samples = jnp.sum(residual * jax.lax.map(apply, residual), axis=1)
  return TraceEstimate(exact + samples.mean(), samples.std(ddof=1) / jnp.sqrt(probes))


def spectral_density(matvec: Callable, like, *, key=None, num_matvecs: int = 30,
                     num_samples: int = 8):
  """Stochastic Lanczos quadrature of a symmetric operator's eigenvalue density.

  For each of ``num_samples`` Gaussian vectors v, ``num_matvecs`` Lanczos steps
  (`matfree.decomp.tridiag_sym`) give a tridiagonal T; its eigenvalues θⱼ are quadrature
  nodes and the squared first components of its eigenvectors their weights, so that
  Σ weights · g(nodes) ≈ tr(g(A)) / n.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of unsharded arrays.
    key: PRNG key of the start vectors (default key 0).
    num_matvecs: Lanczos steps per sample (at most the dimension).
    num_samples: start vectors.

  Returns:
    ``(nodes, weights)``, both of shape (num_samples · num_matvecs,), weights summing to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> nodes, weights = spectrum.spectral_density(lambda v: a @ v, jnp.zeros(3),
    ...                                            num_matvecs=3, num_samples=2)
    >>> sorted({round(float(x), 3) for x in nodes})  # n steps: the exact eigenvalues
    [1.0, 3.0, 5.0]
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
