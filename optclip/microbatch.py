"""Exact micro-batching of every quantity that is a sum over examples.

A loss normalised by the whole batch's count of kept terms (tokens, examples),

    f(x) = Σ_m s_m(x) / C,   s_m = the sum of micro-batch m's terms,  C = the whole count,

has its value, gradient, Hessian-vector products, directional second derivatives (Taylor or
forward mode) and values along a line all linear in f, so each is the sum over micro-batches
of the same operation on s_m / C. `Objective.apply` evaluates any such linear operation one
micro-batch at a time (`optax.microbatching.microbatch` with a SUM accumulator: one
``lax.fori_loop``, so memory holds one micro-batch's activations), and equals the one-shot
program up to summation order. Where the count differs between micro-batches (padding in
translation batches) a mean of micro-batch means would be wrong; C is always the whole
batch's.

    objective = Objective(loss, loss_sum, count, microbatch_size=8)
    value, grads = objective.value_and_grad(params, batch)
    hvp = objective.apply(lambda f: jax.jvp(jax.grad(f), (params,), (v,))[1], batch)

``microbatch_size=0`` runs the one-shot ``loss`` itself (the same program as without
micro-batching, bit for bit).

References:
  optax.microbatching (optax 0.2.8).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching
from jax.sharding import PartitionSpec as P

from optclip.sharding import explicit_spec

__all__ = ["Objective", "as_objective", "concatenated", "divisors", "summed"]


def divisors(n: int) -> list:
  """The micro-batch sizes that divide a batch of ``n`` examples."""
  return [d for d in range(1, n + 1) if n % d == 0]


def _batch_axis_sharding(examples):
  """(the mesh axes the examples' leading axis is split over, how many devices that is) for
  a batch on an explicit-sharding mesh, or None for an unsplit batch."""
  specs = [explicit_spec(x) for x in jax.tree.leaves(examples)]
  split = {spec[0] for spec in specs if spec is not None and spec[0] is not None}
  if not split:
    return None
  if len(split) > 1 or any(spec is None or spec[0] is None for spec in specs):
    raise ValueError("micro-batching: every example array must split its batch axis over "
                     f"the same mesh axes, got {sorted(map(str, split))} and unsplit ones")
  axes = split.pop()
  axes = axes if isinstance(axes, tuple) else (axes,)
  mesh = jax.typeof(jax.tree.leaves(examples)[0]).sharding.mesh
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def _sharded_microbatches(fn, examples, common, microbatch_size: int, accumulation, axes,
                          devices: int):
  """The micro-batch loop for a batch split over ``devices`` along ``axes``: micro-batch j
  takes its examples from every device's own block (``microbatch_size / devices`` each), so
  the split never moves data and every device works on every micro-batch. optax's
  reshape cannot say where its output lies on an explicit-sharding mesh, hence this loop."""
  if microbatch_size % devices:
    raise ValueError(f"microbatch_size={microbatch_size} must be a multiple of the "
                     f"{devices} devices the batch is split over ({', '.join(axes)})")
  local = microbatch_size // devices
  spec = axes if len(axes) > 1 else axes[0]

  def split(x):  # (B, ...) -> (B / microbatch_size, microbatch_size, ...)
    rest = x.shape[1:]
    count = x.shape[0] // microbatch_size
    tail = (None,) * len(rest)
    x = jax.lax.reshape(x, (devices, count, local) + rest,
                        out_sharding=P(spec, None, None, *tail))
    x = jnp.moveaxis(x, 0, 1)
    return jax.lax.reshape(x, (count, microbatch_size) + rest,
                           out_sharding=P(None, spec, *tail))

  parts = jax.tree.map(split, examples)
  if accumulation == optax.microbatching.AccumulationType.SUM:
    # A running sum (never the stacked outputs: for a gradient that would be one copy of
    # the parameters per micro-batch), started from the first micro-batch's output so that
    # the carry has the outputs' own types and shardings.
    first = fn({**jax.tree.map(lambda x: x[0], parts), **common})

    def add(total, part):
      return jax.tree.map(jnp.add, total, fn({**part, **common})), None
    return jax.lax.scan(add, first, jax.tree.map(lambda x: x[1:], parts))[0]
  outputs = jax.lax.map(lambda part: fn({**part, **common}), parts)

  def join(y):  # (count, microbatch_size, ...) -> (B, ...) in the batch's own order
    count, rest = y.shape[0], y.shape[2:]
    tail = (None,) * len(rest)
    y = jax.lax.reshape(y, (count, devices, local) + rest,
                        out_sharding=P(None, spec, None, *tail))
    y = jnp.moveaxis(y, 1, 0)
    return jax.lax.reshape(y, (count * microbatch_size,) + rest,
                           out_sharding=P(spec, *tail))
  return jax.tree.map(join, outputs)


def _concatenated_sharded_outputs(fn, examples, common, microbatch_size: int):
  """CONCAT over an unsplit batch whose outputs are sharded (per-example gradients of FSDP
  leaves, for a batch of 25 that no mesh axis divides): optax's reshape cannot say where
  its output lies on an explicit-sharding mesh, hence this loop."""
  parts = jax.tree.map(lambda x: x.reshape((x.shape[0] // microbatch_size, microbatch_size)
                                           + x.shape[1:]), examples)
  outputs = jax.lax.map(lambda part: fn({**part, **common}), parts)

  def join(y):  # (count, microbatch_size, ...) -> (B, ...), each block where it was
    shape = (y.shape[0] * y.shape[1],) + y.shape[2:]
    spec = explicit_spec(y)
    return (y.reshape(shape) if spec is None else
            jax.lax.reshape(y, shape, out_sharding=P(None, *tuple(spec)[2:])))
  return jax.tree.map(join, outputs)


def _over_microbatches(fn, batch, microbatch_size: int, accumulation, shared):
  examples = {k: v for k, v in batch.items() if k not in shared}
  common = {k: v for k, v in batch.items() if k in shared}
  size = int(jax.tree.leaves(examples)[0].shape[0])
  if size % microbatch_size:
    raise ValueError(f"microbatch_size={microbatch_size} does not divide the batch of "
                     f"{size}; sizes that do: {divisors(size)}")
  sharded = _batch_axis_sharding(examples)
  if sharded is not None:
    return _sharded_microbatches(fn, examples, common, microbatch_size, accumulation,
                                 *sharded)
  if accumulation == optax.microbatching.AccumulationType.CONCAT:
    outputs = jax.eval_shape(lambda part: fn({**part, **common}),
                             jax.tree.map(lambda x: x[:microbatch_size], examples))
    if any(explicit_spec(y) is not None for y in jax.tree.leaves(outputs)):
      return _concatenated_sharded_outputs(fn, examples, common, microbatch_size)
  return optax.microbatching.microbatch(
      lambda part: fn({**part, **common}), argnums=0, microbatch_size=microbatch_size,
      accumulator=accumulation)(examples)


def summed(fn: Callable, batch: dict, microbatch_size: int, shared: tuple = ()):
  """Σ over micro-batches of ``fn(micro-batch)``: ``fn(batch)`` for ``fn`` a sum over the
  batch's examples (a summed loss, its derivatives, a Gauss-Newton product, ...), one
  micro-batch of ``microbatch_size`` examples at a time. Keys in ``shared`` are passed whole
  to every micro-batch."""
  return _over_microbatches(fn, batch, microbatch_size,
                            optax.microbatching.AccumulationType.SUM, shared)


def concatenated(fn: Callable, batch: dict, microbatch_size: int, shared: tuple = ()):
  """``fn(batch)`` for ``fn`` per example (outputs with a leading example axis, such as
  per-example gradients), one micro-batch at a time, concatenated."""
  return _over_microbatches(fn, batch, microbatch_size,
                            optax.microbatching.AccumulationType.CONCAT, shared)


class Objective(NamedTuple):
  """A loss as a sum of terms over a batch, for exact micro-batching.

  Attributes:
    loss: ``(params, batch) -> scalar``, the mean over the batch's kept terms.
    loss_sum: ``(params, batch) -> scalar``, the sum of those terms.
    count: ``batch -> scalar``, how many terms ``loss`` divides the sum by (it reads only
      the batch: labels, masks, the batch size).
    microbatch_size: examples per micro-batch; 0 for the whole batch in one pass.
    shared: batch keys that every micro-batch sees whole (state that is not per example,
      such as BatchNorm's running statistics).
  """
  loss: Callable
  loss_sum: Callable
  count: Callable
  microbatch_size: int = 0
  shared: tuple = ()

  def apply(self, operation: Callable, batch) -> Any:
    """``operation(f)`` for f(params) = the loss on ``batch``, where ``operation`` is linear
    in f (a value, a gradient, a Hessian-vector product, uᵀ∇²f u, f along a line, ...),
    evaluated one micro-batch at a time and summed.

    Raises:
      ValueError: naming the sizes that divide, where ``microbatch_size`` does not divide
        the batch.
    """
    if not self.microbatch_size:
      return operation(lambda params: self.loss(params, batch))
    total = self.count({k: v for k, v in batch.items() if k not in self.shared})
    return summed(lambda part: operation(lambda params: self.loss_sum(params, part) / total),
                  batch, self.microbatch_size, self.shared)

  def value(self, params, batch):
    return self.apply(lambda f: f(params), batch)

  def value_and_grad(self, params, batch):
    return self.apply(lambda f: jax.value_and_grad(f)(params), batch)

  def grad(self, params, batch):
    return self.apply(lambda f: jax.grad(f)(params), batch)


def as_objective(loss) -> Objective:
  """``loss`` as an `Objective`: itself if it is one, else a loss function
  ``(params, batch) -> scalar`` evaluated in one pass."""
  return loss if isinstance(loss, Objective) else Objective(loss, None, None)
