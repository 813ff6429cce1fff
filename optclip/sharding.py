"""Meshes and FSDP-style placement with JAX's own sharding (no home-made communication).

    mesh = mesh_from_spec("data=2,fsdp=4")
    params = shard_params(params, mesh)          # largest divisible axis over "fsdp"
    batch = shard_batch(batch, mesh)             # leading axis over "data"

Everything in optclip reduces leaf by leaf (``jnp.sum(a * b)``, per-leaf counts), so the
clipping threshold, the optimizers and the geometry probes run on such arrays with only
scalar all-reduces between devices.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "batch_spec",
    "batch_spec_for",
    "explicit_spec",
    "fsdp_spec",
    "gathered",
    "gathered_loss",
    "logical_to_spec",
    "mesh_from_spec",
    "parse_mesh_spec",
    "place_by_rules",
    "placed_like",
    "placement",
    "shard_batch",
    "shard_params",
]

# Leaves smaller than this stay replicated: splitting them costs more than it saves.
MIN_SHARDED_SIZE = 2 ** 14


def explicit_spec(x) -> PartitionSpec | None:
  """The PartitionSpec in ``x``'s type when an explicit-sharding mesh splits it, else None."""
  try:
    spec = jax.typeof(x).sharding.spec
  except AttributeError:
    return None
  return spec if any(axis is not None for axis in spec) else None


def placed_like(value, like):
  """``value`` resharded as ``like`` is placed where ``like`` lives on an explicit-sharding
  mesh (split or replicated), else unchanged: a result computed from other placements (a
  sum over a split axis, fresh zeros or random numbers) goes back where its counterpart
  is, so that states keep their placement (no recompilation, donation works) and
  concatenations see operands placed alike.

  Args:
    value: an array shaped like ``like``.
    like: the array whose placement ``value`` takes.

  Returns:
    ``value``, placed as ``like``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import sharding
    >>> sharding.placed_like(jnp.zeros(3), jnp.ones(3))  # no mesh: unchanged
    Array([0., 0., 0.], dtype=float32)
  """
  sharding = getattr(jax.typeof(like), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(t == jax.sharding.AxisType.Explicit
                             for t in getattr(mesh, "axis_types", ())):
    return value
  return jax.sharding.reshard(value, sharding.spec)


def parse_mesh_spec(spec: str) -> dict:
  """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; raises ValueError naming the bad part."""
  axes = {}
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    name, _, size = part.partition("=")
    name = name.strip()
    if not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh spec: expected NAME=SIZE, got {part!r} in {spec!r}")
    if name in axes:
      raise ValueError(f"mesh spec: axis {name!r} given twice in {spec!r}")
    axes[name] = int(size)
  if not axes:
    raise ValueError(f"mesh spec: no axes in {spec!r}")
  return axes


def mesh_from_spec(spec: str | Mapping[str, int], devices: Sequence | None = None) -> Mesh:
  """A mesh with the named axis sizes and explicit sharding on every axis."""
  axes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
  devices = list(jax.devices() if devices is None else devices)
  needed = int(np.prod(list(axes.values())))
  if needed != len(devices):
    raise ValueError(f"mesh spec {axes} needs {needed} devices, {len(devices)} available")
  # Explicit axes asked for by name: JAX's default for make_mesh only from 0.10 on.
  explicit = (jax.sharding.AxisType.Explicit,) * len(axes)
  return jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices, axis_types=explicit)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = "fsdp",
              min_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
  """Shards the largest dimension divisible by the axis size; replicates small leaves.

  The spec names every dimension (``P(None, None)``, not ``P()``): that is how a jitted
  program's outputs spell their sharding, and `jax.jit` keys its cache on the spelling, so a
  state placed as ``P()`` would compile the step a second time when it comes back."""
  size = mesh.shape.get(axis, 1)
  spec = [None] * len(shape)
  candidates = [(dim, i) for i, dim in enumerate(shape) if dim % size == 0]
  if size > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size and candidates:
    spec[max(candidates)[1]] = axis
  return PartitionSpec(*spec)


def shard_params(tree: Any, mesh: Mesh, axis: str = "fsdp",
                 min_size: int = MIN_SHARDED_SIZE) -> Any:
  """Places every leaf FSDP-style (see `fsdp_spec`); also right for optimizer states."""
  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(np.shape(x), mesh, axis,
                                                                min_size))), tree)


def batch_spec(ndim: int, axis: str | tuple = "data") -> PartitionSpec:
  return PartitionSpec(axis, *([None] * (ndim - 1))) if ndim else PartitionSpec()


def batch_spec_for(shape: Sequence[int], mesh: Mesh,
                   axes: Sequence[str] = ("data", "fsdp")) -> PartitionSpec:
  """The leading (batch) axis split over as many of ``axes`` as divide it, in order (FSDP
  gives every device its own examples: over data and fsdp together where the batch
  divides, over data alone where only that does), else replicated."""
  present = [a for a in axes if mesh.shape.get(a, 1) > 1]
  if not shape:
    return PartitionSpec()
  for count in range(len(present), 0, -1):
    chosen = tuple(present[:count])
    if shape[0] % int(np.prod([mesh.shape[a] for a in chosen])) == 0:
      return batch_spec(len(shape), chosen if len(chosen) > 1 else chosen[0])
  return PartitionSpec(*([None] * len(shape)))  # every dimension named: see `fsdp_spec`


def shard_batch(batch: Any, mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> Any:
  """Splits the leading (batch) axis of every leaf over ``axes`` (see `batch_spec_for`).

  Leaves whose leading axis does not divide evenly (a batch of 25 on data=2, scalars) are
  replicated instead.
  """
  if isinstance(axes, str):
    axes = (axes,)
  return jax.tree.map(lambda x: jax.device_put(
      x, NamedSharding(mesh, batch_spec_for(np.shape(x), mesh, axes))), batch)


def placement(mesh: Mesh | None, min_size: int = MIN_SHARDED_SIZE):
  """``(context, place_params, place_batch)`` for running on ``mesh``.

  The context sets the mesh (`jax.set_mesh`); parameters and optimizer states go FSDP-style
  over ``fsdp`` (leaves under ``min_size`` coordinates stay replicated; tests pass 0 to
  split every leaf) and batches over ``data``. With ``mesh=None`` all three do nothing.
  """
  if mesh is None:
    return contextlib.nullcontext(), (lambda tree: tree), (lambda batch: batch)
  return (jax.set_mesh(mesh), functools.partial(shard_params, mesh=mesh, min_size=min_size),
          functools.partial(shard_batch, mesh=mesh))


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Sequence[tuple[str, str | None]]) -> PartitionSpec:
  """Maps logical axis names to mesh axes by a rule table, like Flax's logical axis rules.

  ``rules`` is a sequence of (logical name, mesh axis or None); the first rule for a name
  wins, and a mesh axis is used at most once per array.
  """
  table = {}
  for logical, physical in rules:
    table.setdefault(logical, physical)
  used, spec = set(), []
  for name in logical_axes:
    physical = table.get(name) if name is not None else None
    if physical in used:
      physical = None
    if physical is not None:
      used.add(physical)
    spec.append(physical)
  return PartitionSpec(*spec)


def place_by_rules(tree: Any, logical_axes: Any, rules: Sequence[tuple[str, str | None]],
                   mesh: Mesh) -> Any:
  """Places each leaf by its logical axis names (a matching pytree of tuples)."""
  return jax.tree.map(
      lambda x, names: jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, rules))),
      tree, logical_axes, is_leaf=lambda n: isinstance(n, tuple))


def gathered_loss(loss_fn):
  """FSDP's compute pattern for ``loss_fn(params, batch)`` under an explicit-sharding mesh:
  the parameters are all-gathered (resharded to replicated) for the computation, the batch
  stays split along its data axis, and the gradient flows back as a reduce-scatter onto the
  parameters' own sharding. Use inside ``jax.set_mesh(mesh)``."""
  def sharded_loss(params, batch):
    return loss_fn(gathered(params), batch)
  return sharded_loss


def gathered(tree: Any) -> Any:
  """Every leaf resharded to replicated: FSDP's all-gather before a computation, whose
  transpose under `jax.grad` is the reduce-scatter back onto each leaf's own sharding. Use
  inside ``jax.set_mesh(mesh)``.

  Args:
    tree: a pytree of arrays on an explicit-sharding mesh.

  Returns:
    The same values, every leaf replicated over the mesh.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optclip import sharding
    >>> mesh = sharding.mesh_from_spec("fsdp=1", devices=jax.devices()[:1])
    >>> with jax.set_mesh(mesh):
    ...   print(tuple(jax.typeof(sharding.gathered({"w": jnp.ones((4, 2))})["w"]).sharding.spec))
    (None, None)
  """
  return jax.tree.map(lambda x: jax.sharding.reshard(x, PartitionSpec()), tree)
