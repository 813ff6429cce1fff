"""Matrix-free spectra of symmetric operators given as ``matvec(v) -> same pytree as v``:
the top eigenvalue and top-k eigenpairs (Lanczos), the trace (Hutch++, Hutchinson,
XTrace), the spectral density (stochastic Lanczos quadrature), block densities and the
Jensen-Shannon distances between them.

Why a Lanczos of our own: matfree (kept for XTrace) flattens its
pytrees with ``ravel_pytree``, and under an explicit-sharding mesh that concatenation
raises. `lanczos` keeps every vector leaf by leaf, sharded like the parameters, with inner
products as ``jnp.sum(a * b)`` per leaf: per step it communicates a few scalars per leaf
beyond the product itself. SLQ, the block densities, Hutch++ and Hutchinson are built on
such leaf-by-leaf vectors, so they run on sharded parameters across devices and processes;
the small dense work (the tridiagonal's and the Gram matrix's eigensolvers) is
`jnp.linalg.eigh` on matrices of the number of steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from matfree import stochtrace

from optclip.sharding import explicit_spec, placed_like

__all__ = ["JensenShannon", "TraceEstimate", "block_spectral_densities", "density_curve",
           "eigenpairs", "js_distances", "lanczos", "preconditioned", "spectral_density",
           "top_eigenvalue", "trace"]


def _unsharded(like, what: str):
  if any(explicit_spec(x) is not None for x in jax.tree.leaves(like)):
    raise ValueError(f"{what}: matfree flattens the parameters, which explicit sharding "
                     "forbids; use optclip.curvature.top_hessian_eigenvalue (leaf by leaf) "
                     "on sharded parameters")


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


def _stacked_like(stacked, leaf):
  """``stacked`` (a leading axis, then ``leaf``'s shape) sharded like ``leaf`` on its own
  axes where an explicit-sharding mesh splits ``leaf``."""
  spec = explicit_spec(leaf)
  return stacked if spec is None else jax.sharding.reshard(
      stacked, jax.sharding.PartitionSpec(None, *spec))


def _stacked_zeros(leaf, count: int):
  """Zeros of shape (count, *leaf.shape), sharded like ``leaf`` on its own axes."""
  return _stacked_like(jnp.zeros((count,) + jnp.shape(leaf), jnp.result_type(leaf)), leaf)


def lanczos(matvec: Callable, start, num_steps: int):
  """``num_steps`` Lanczos steps with full reorthogonalisation, leaf by leaf.

  Unlike matfree (which ravels its pytrees), every vector here keeps the structure and the
  sharding of ``start``: the Krylov basis is stored per leaf with a leading axis, inner
  products are ``jnp.sum(a * b)`` per leaf, so the only communication beyond ``matvec``
  is a few scalars per leaf and step (the step's α, β and the reorthogonalisation
  coefficients, all reduced over every leaf's shards). Once the Krylov space is exhausted
  (breakdown: the residual vanishes), the remaining steps add copies of the first α
  decoupled from the rest (β = 0) and zero basis vectors: their Ritz values carry zero
  quadrature weight, the tridiagonal's other eigenvalues are those of the steps before,
  and nothing divides by a vanishing norm.

  This is the one piece of Lanczos optclip writes itself (matfree's ``tridiag_sym`` ravels
  its vectors, which explicit sharding forbids); the small dense work on the tridiagonal
  stays with `jnp.linalg.eigh`.

  Args:
    matvec: ``v -> A v`` on pytrees like ``start``, A symmetric.
    start: the first Krylov vector, a pytree of arrays with unit norm.
    num_steps: Lanczos steps (products with A), a positive integer.

  Returns:
    ``(alphas (num_steps,), betas (num_steps - 1,), basis)``: the tridiagonal's diagonal and
    off-diagonal, and the basis, a pytree like ``start`` with a leading axis num_steps.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> alphas, betas, _ = spectrum.lanczos(lambda v: a @ v, jnp.ones(3) / 3 ** 0.5, 3)
    >>> t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    >>> [round(float(x), 3) for x in jnp.linalg.eigvalsh(t)]
    [1.0, 3.0, 5.0]
  """
  num_steps = _positive_int(num_steps, "num_steps")
  basis = jax.tree.map(lambda v: _stacked_zeros(v, num_steps), start)

  def step(i, carry):
    basis, alphas, betas, v, v_prev, beta, scale, alive = carry
    basis = jax.tree.map(lambda b, x: b.at[i].set(x), basis, v)
    w = matvec(v)
    alpha = _tree_dot(w, v)
    w = jax.tree.map(lambda a, b, c: (a - alpha * b - beta * c).astype(b.dtype), w, v, v_prev)
    # Full reorthogonalization against the stored basis (rows beyond i are zero).
    coeffs = _stacked_dots(basis, w)
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
  carry = (basis, jnp.zeros((num_steps,)), jnp.zeros((num_steps,)), start, zeros,
           jnp.zeros(()), jnp.zeros(()), jnp.asarray(True))
  basis, alphas, betas, *_ = jax.lax.fori_loop(0, num_steps, step, carry)
  return alphas, betas[:-1], basis


def _tridiagonal_matrix(alphas, betas):
  return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def _unit_normal_like(key, like, mask=None):
  """A Gaussian pytree like ``like`` (sharded like it), zero outside ``mask``, unit norm."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  masks = [None] * len(leaves) if mask is None else jax.tree.leaves(mask)
  start = [placed_like(jax.random.normal(k, jnp.shape(l), jnp.result_type(l)), l)
           for k, l in zip(keys, leaves)]
  start = [v if m is None else v * jnp.asarray(m, v.dtype) for v, m in zip(start, masks)]
  start = jax.tree.unflatten(treedef, start)
  norm = jnp.sqrt(_tree_dot(start, start))
  return jax.tree.map(lambda v: v / norm, start)


def preconditioned(matvec: Callable, preconditioner) -> Callable:
  """v -> P^(-1/2) A P^(-1/2) v for a positive diagonal P (a pytree like the vectors): the
  symmetric operator similar to P⁻¹A, so Lanczos on it finds P⁻¹A's eigenvalues.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([6., 2.]))
    >>> pa = spectrum.preconditioned(lambda v: a @ v, jnp.array([6., 0.5]))
    >>> [round(float(x), 4) for x in pa(jnp.ones(2))]
    [1.0, 4.0]
  """
  scale = jax.tree.map(jax.lax.rsqrt, preconditioner)
  scaled = lambda v: jax.tree.map(lambda s, x: (s * x).astype(x.dtype), scale, v)
  return lambda v: scaled(matvec(scaled(v)))


def top_eigenvalue(matvec: Callable, like, *, iters: int = 30, key=None) -> jax.Array:
  """The largest (algebraic) eigenvalue of a symmetric operator by `lanczos` (full
  reorthogonalisation, leaf by leaf, so also on explicitly sharded vectors).

  ``iters`` is capped at the dimension; after a Krylov breakdown the answer is that of the
  steps before (no NaN).

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
  start = _unit_normal_like(jax.random.key(0) if key is None else key, like)
  alphas, betas, _ = lanczos(matvec, start, iters)
  return jnp.linalg.eigvalsh(_tridiagonal_matrix(alphas, betas))[-1]


def eigenpairs(matvec: Callable, like, k: int, *, key=None, num_matvecs: int | None = None):
  """The ``k`` largest eigenvalues (descending) and unit eigenvectors of a symmetric operator.

  `lanczos` (full reorthogonalisation, leaf by leaf, so also on explicitly sharded
  vectors) from a Gaussian start, ``num_matvecs`` products (default
  max(2k + 20, 30), at most the dimension): the extreme Ritz pairs converge first.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of arrays (the shapes, dtypes and shardings of the vectors).
    k: how many pairs, 1 <= k <= the dimension.
    key: PRNG key of the start vector (default key 0).
    num_matvecs: products, at least k.

  Returns:
    ``(eigenvalues (k,), eigenvectors)``, the latter a pytree like ``like`` with a leading
    axis of size k.

  Raises:
    ValueError: for k or num_matvecs out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> values, _ = spectrum.eigenpairs(lambda v: a @ v, jnp.zeros(3), 2, num_matvecs=3)
    >>> [round(float(v), 3) for v in values]
    [5.0, 3.0]
  """
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
  start = _unit_normal_like(jax.random.key(0) if key is None else key, like)
  alphas, betas, basis = lanczos(matvec, start, num)
  values, vectors = jnp.linalg.eigh(_tridiagonal_matrix(alphas, betas))
  # Ritz pairs past a Krylov breakdown rest on zero basis vectors: rank them last.
  alive = sum(jnp.sum(b ** 2, axis=tuple(range(1, b.ndim)))
              for b in jax.tree.leaves(basis)) > 0
  genuine = jnp.sum(jnp.where(alive[:, None], vectors ** 2, 0.0), axis=0) > 0.5
  order = jnp.argsort(jnp.where(genuine, values, -jnp.inf))[::-1][:k]
  # A combination over the basis' own (unsharded) leading axis.
  combine = lambda b: jnp.einsum("ij,i...->j...", vectors[:, order].astype(b.dtype), b)
  return values[order], jax.tree.map(combine, basis)


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
  ``"hutchinson"``: the plain Monte Carlo estimator with Rademacher vectors.
  With at least the dimension of products, the trace is computed exactly. Hutch++ and
  Hutchinson work leaf by leaf (also on explicitly sharded vectors: the sketch is
  orthonormalised through its small Gram matrix); XTrace flattens and needs unsharded ones.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of arrays.
    key: PRNG key of the probes (default key 0).
    num_matvecs: products in all (at least `MINIMUM_MATVECS` of the method, else the
      standard error could not be estimated).
    method: "hutch++", "xtrace" or "hutchinson".

  Returns:
    A `TraceEstimate` (``trace``, ``stderr``; ``stderr`` 0 only where exact).

  Raises:
    ValueError: for an unknown method or too few products, or XTrace on sharded vectors.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = jnp.diag(jnp.array([5., 1., 3.]))
    >>> estimate = spectrum.trace(lambda v: a @ v, jnp.zeros(3), num_matvecs=3)
    >>> float(estimate.trace), float(estimate.stderr)
    (9.0, 0.0)
  """
  n = _size(like)
  num_matvecs = _positive_int(num_matvecs, "num_matvecs")
  if method not in MINIMUM_MATVECS:
    raise ValueError(f"method must be 'hutch++', 'xtrace' or 'hutchinson', got {method!r}")
  if num_matvecs < min(MINIMUM_MATVECS[method], n):
    raise ValueError(f"num_matvecs={num_matvecs} is too few for {method} to estimate its own "
                     f"error: at least {MINIMUM_MATVECS[method]} (or the dimension, {n}, for "
                     "the exact trace)")
  key = jax.random.key(0) if key is None else key
  quadratic_form = lambda v: _tree_dot(v, matvec(v))
  if num_matvecs >= n:
    exact = jax.lax.map(lambda i: quadratic_form(_unit_vector_like(like, i)), jnp.arange(n))
    return TraceEstimate(jnp.sum(exact), jnp.zeros(()))
  if method == "xtrace":
    _unsharded(like, "trace(method='xtrace')")
    flat, unravel = ravel_pytree(like)
    estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
        stochtrace.leave_one_out_xtrace(),
        stochtrace.sampler_normal(flat, num=max(2, num_matvecs // 2)))
    value, stderr = estimate(lambda v: ravel_pytree(matvec(unravel(v)))[0], key)
    return TraceEstimate(value, stderr)
  if method == "hutchinson":
    samples = jax.lax.map(quadratic_form, _stacked_signs(key, like, num_matvecs))
    return TraceEstimate(samples.mean(), samples.std(ddof=1) / jnp.sqrt(num_matvecs))
  sketch = max(1, num_matvecs // 3)
  probes = max(1, num_matvecs - 2 * sketch)
  s_key, g_key = jax.random.split(key)
  q = _orthonormal_rows(jax.lax.map(matvec, _stacked_signs(s_key, like, sketch)))
  exact = jnp.sum(jax.lax.map(quadratic_form, q))
  g = _stacked_signs(g_key, like, probes)
  # (I - QQᵀ) g for every probe g: coefficients by sums of products, then a combination of
  # Q's rows over their own (unsharded) leading axis.
  coefficients = jax.lax.map(lambda row: _stacked_dots(q, row), g)  # (probes, sketch)
  residual = jax.tree.map(
      lambda gl, ql: gl - jnp.einsum("pk,k...->p...", coefficients.astype(ql.dtype), ql), g, q)
  samples = jax.lax.map(quadratic_form, residual)
  return TraceEstimate(exact + samples.mean(), samples.std(ddof=1) / jnp.sqrt(probes))


def _stacked_signs(key, like, count: int):
  """``count`` Rademacher pytrees like ``like`` stacked on a leading axis, sharded like it."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  stacked = []
  for k, leaf in zip(keys, leaves):
    stacked.append(_stacked_like(jax.random.rademacher(
        k, (count,) + jnp.shape(leaf), jnp.result_type(leaf)), leaf))
  return jax.tree.unflatten(treedef, stacked)


def _stacked_dots(stacked, vector):
  """⟨row_i, vector⟩ for every row of a stacked pytree: shape (rows,). Products and sums,
  not tensordot: a contraction over a sharded axis raises under explicit sharding, an
  elementwise product summed over it does not."""
  return sum(jnp.sum(s * v[None].astype(s.dtype), axis=tuple(range(1, s.ndim)))
             for s, v in zip(jax.tree.leaves(stacked), jax.tree.leaves(vector)))


def _orthonormal_rows(stacked):
  """An orthonormal basis of a stacked pytree's rows (its range, for Hutch++'s sketch).

  The Gram matrix of the rows by sums of products (sharding-safe), an eigendecomposition
  G = UΛUᵀ, rows Λ^(-1/2) Uᵀ S, twice for orthogonality to rounding (as CholeskyQR2). Rows
  of a rank-deficient sketch (λ at rounding level) become zero, which spans the same space.
  """
  for _ in range(2):
    gram = jax.lax.map(lambda row: _stacked_dots(stacked, row), stacked)
    values, vectors = jnp.linalg.eigh(gram)
    keep = values > 1e-6 * jnp.max(values)
    transform = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, values, 1.0)), 0.0) * vectors
    stacked = jax.tree.map(
        lambda s: jnp.einsum("ij,i...->j...", transform.astype(s.dtype), s), stacked)
  return stacked


def _unit_vector_like(like, index):
  """The ``index``-th standard basis vector (leaves in order, each leaf row-major), as a
  pytree like ``like`` sharded like it."""
  leaves, treedef = jax.tree.flatten(like)
  out, offset = [], 0
  for leaf in leaves:
    size = int(jnp.size(leaf))
    positions = jnp.arange(size).reshape(jnp.shape(leaf))
    out.append(placed_like((positions == index - offset).astype(jnp.result_type(leaf)), leaf))
    offset += size
  return jax.tree.unflatten(treedef, out)


def spectral_density(matvec: Callable, like, *, key=None, num_matvecs: int = 30,
                     num_samples: int = 8):
  """Stochastic Lanczos quadrature of a symmetric operator's eigenvalue density.

  For each of ``num_samples`` Gaussian vectors v, ``num_matvecs`` steps of `lanczos`
  (leaf by leaf, so also on sharded vectors) give a tridiagonal T; its eigenvalues θⱼ are quadrature
  nodes and the squared first components of its eigenvectors their weights, so that
  Σ weights · g(nodes) ≈ tr(g(A)) / n.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of arrays.
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
  num = min(_size(like), _positive_int(num_matvecs, "num_matvecs"))
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          _positive_int(num_samples, "num_samples"))
  return _density(matvec, like, keys, num)


def _density(matvec, like, keys, num_steps, mask=None):
  """SLQ over the start vectors of ``keys`` (restricted to ``mask`` where given)."""
  nodes, weights = jax.lax.map(
      lambda k: _quadrature(matvec, _unit_normal_like(k, like, mask), num_steps), keys)
  return nodes.reshape(-1), weights.reshape(-1) / keys.shape[0]


def _quadrature(matvec, start, num_steps):
  """SLQ's nodes and weights from one start vector (`lanczos`, then the tridiagonal's
  eigenvalues and its eigenvectors' squared first components)."""
  alphas, betas, _ = lanczos(matvec, start, num_steps)
  nodes, vectors = jnp.linalg.eigh(_tridiagonal_matrix(alphas, betas))
  return nodes, vectors[0] ** 2


def block_spectral_densities(matvec: Callable, like, labels, *, key=None,
                             num_matvecs: int = 30, num_samples: int = 8) -> dict:
  """SLQ densities of the diagonal blocks A_bb of a symmetric operator, one per block.

  A block is the set of leaves with one label (`optclip.blocks.partition`). Block b's
  Lanczos runs on vectors zero outside b, with v -> (A v) restricted to b, so it sees A_bb
  alone (Zhang et al. 2024's blockwise spectra). All blocks run in one compiled program
  (`jax.lax.map` over per-block masks): the cost is ``num_blocks · num_samples ·
  num_matvecs`` products with A; a block smaller than ``num_matvecs`` stops at its
  dimension (its extra steps carry zero weight). Leaf by leaf, so also on sharded vectors.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``.
    like: a pytree of arrays.
    labels: a pytree of strings like ``like`` (or a prefix of it), the block of each leaf.
    key: PRNG key of the start vectors (default key 0); every block uses the same keys.
    num_matvecs: Lanczos steps per sample and block (at most the largest block's size).
    num_samples: start vectors per block.

  Returns:
    ``{label: (nodes, weights)}`` in order of first appearance, each as `spectral_density`
    returns it (the block's density, weights summing to 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import spectrum
    >>> a = {"x": jnp.array([4., 2.]), "y": jnp.array([1.])}
    >>> matvec = lambda v: {"x": a["x"] * v["x"], "y": a["y"] * v["y"]}
    >>> densities = spectrum.block_spectral_densities(matvec, a, {"x": "big", "y": "small"},
    ...                                               num_matvecs=2, num_samples=1)
    >>> {name: sorted(round(float(x), 3) for x, p in zip(n, w) if p > 1e-6)
    ...  for name, (n, w) in densities.items()}   # each block's eigenvalues, alone
    {'big': [2.0, 4.0], 'small': [1.0]}
  """
  leaves, treedef = jax.tree.flatten(like)
  leaf_labels = jax.tree.leaves(jax.tree.broadcast(labels, like))
  names = list(dict.fromkeys(leaf_labels))
  sizes = {name: sum(int(jnp.size(l)) for l, b in zip(leaves, leaf_labels) if b == name)
           for name in names}
  num = min(max(sizes.values()), _positive_int(num_matvecs, "num_matvecs"))
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          _positive_int(num_samples, "num_samples"))
  # masks[i][b] = 1 where leaf i belongs to block b.
  masks = jax.tree.unflatten(treedef, [
      jnp.asarray([float(b == name) for name in names]) for b in leaf_labels])

  def one_block(mask):
    restricted = lambda v: jax.tree.map(lambda m, x: (m * x).astype(x.dtype), mask, matvec(v))
    return _density(restricted, like, keys, num, mask)

  nodes, weights = jax.lax.map(one_block, masks)
  return {name: (nodes[i], weights[i]) for i, name in enumerate(names)}


def density_curve(nodes, weights, grid, width: float) -> np.ndarray:
  """The density Σⱼ wⱼ 𝒩(x; θⱼ, width²) of stochastic Lanczos quadrature's (nodes θ,
  weights w) on ``grid`` (NumPy, float64): the quadrature's point masses smoothed by a
  Gaussian of ``width`` (as PyHessian's and Zhang et al.'s density plots do), so that it
  integrates to Σ w = 1."""
  nodes, weights = np.ravel(np.asarray(nodes, np.float64)), np.ravel(np.asarray(weights,
                                                                                np.float64))
  grid = np.asarray(grid, np.float64)[:, None]
  gauss = np.exp(-0.5 * ((grid - nodes) / width) ** 2) / (width * np.sqrt(2 * np.pi))
  return gauss @ weights


class JensenShannon(NamedTuple):
  """Jensen-Shannon distances between block densities."""
  names: list          # the blocks, in the matrix's order
  distances: np.ndarray  # (blocks, blocks), symmetric, zero diagonal
  mean: float          # the mean over distinct pairs: Zhang et al.'s JS⁰ at initialisation


def js_distances(densities: dict, *, width: float | None = None,
                 points: int = 2000) -> JensenShannon:
  """The Jensen-Shannon distance between every pair of block densities.

  Each (nodes, weights) is smoothed by `density_curve` on one grid spanning all blocks'
  nodes (± 5 widths) and normalised to a discrete distribution p on it; the distance is
  √(½ KL(p‖m) + ½ KL(q‖m)), m = (p + q)/2, natural logarithm (so in [0, √ln 2], as
  `scipy.spatial.distance.jensenshannon`). The smoothing width defaults to 1% of the
  nodes' whole range. Zhang et al. (2024) average it over block pairs at initialisation
  (JS⁰) to measure block heterogeneity; their width and grid are their code's, not ours.

  Args:
    densities: ``{name: (nodes, weights)}``, as `block_spectral_densities` returns.
    width: the Gaussian's standard deviation (default 1% of the range of all nodes).
    points: grid points.

  Returns:
    A `JensenShannon` (names, distance matrix, mean over pairs).

  Example:
    >>> import numpy as np
    >>> from optclip import spectrum
    >>> same = (np.array([1.0]), np.array([1.0]))
    >>> far = (np.array([100.0]), np.array([1.0]))
    >>> js = spectrum.js_distances({"a": same, "b": same, "c": far}, width=1.0)
    >>> np.round(js.distances, 3).tolist()
    [[0.0, 0.0, 0.833], [0.0, 0.0, 0.833], [0.833, 0.833, 0.0]]
  """
  if len(densities) < 2:
    raise ValueError(f"js_distances needs at least two densities, got {len(densities)}")
  names = list(densities)
  nodes = [np.ravel(np.asarray(densities[n][0], np.float64)) for n in names]
  low = min(float(x.min()) for x in nodes)
  high = max(float(x.max()) for x in nodes)
  width = float(width) if width else max(0.01 * (high - low), 1e-12)
  if not width > 0:
    raise ValueError(f"width must be positive, got {width!r}")
  grid = np.linspace(low - 5 * width, high + 5 * width, _positive_int(points, "points"))
  curves = []
  for name in names:
    curve = density_curve(densities[name][0], densities[name][1], grid, width)
    curves.append(curve / curve.sum())
  distances = np.zeros((len(names), len(names)))
  for i in range(len(names)):
    for j in range(i + 1, len(names)):
      p, q = curves[i], curves[j]
      # a·log(a/m) with a/m = 2a/(a + b): finite wherever a > 0, even where m = (a + b)/2
      # would underflow (denormal tails of the Gaussians).
      kl = lambda a, b: float(np.sum(a[a > 0] * np.log(2 * a[a > 0] / (a[a > 0] + b[a > 0]))))
      distances[i, j] = distances[j, i] = np.sqrt(max(0.5 * kl(p, q) + 0.5 * kl(q, p), 0.0))
  pairs = distances[np.triu_indices(len(names), 1)]
  return JensenShannon(names, distances, float(pairs.mean()))
