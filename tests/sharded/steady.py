"""A donated step of every optclip optimizer on a data=2,fsdp=4 mesh of 8 CPU devices returns
parameters and states placed as they came in: one compilation for three steps, every buffer
donated (run by tests/test_sharding.py: JAX fixes the device count at start-up)."""

import os
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optclip  # noqa: E402
from optclip import sharding  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda: optclip.sgd(1e-2, momentum=0.9, clip=0.1),
    "normalized sgd": lambda: optclip.normalized_sgd(1e-2, clip=0.1),
    "sign sgd": lambda: optclip.sign_sgd(1e-3),
    "adam": lambda: optclip.adam(1e-3, clip=0.5),
    "adam, clip update": lambda: optclip.adam(1e-3, clip_update=0.5),
    "adafactor": lambda: optclip.adafactor(1e-2, clip=0.5),
    "lion": lambda: optclip.lion(1e-4, clip=0.5),
    "lion, clip update": lambda: optclip.lion(1e-4, clip_update=0.5),
}


def params():
  # A sharded matrix whose factored statistics are small enough to stay replicated, a
  # replicated vector, a scalar.
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((64, 512)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(64), jnp.float32), "scale": jnp.ones(())}


mesh = sharding.mesh_from_spec("data=2,fsdp=4")
with jax.set_mesh(mesh):
  for name, make in OPTIMIZERS.items():
    tx = make()
    placed = sharding.shard_params(params(), mesh, min_size=1024)
    assert sharding.explicit_spec(placed["w"]) is not None
    state = sharding.shard_params(tx.init(placed), mesh, min_size=1024)

    def step(p, s):
      grads = jax.tree.map(lambda x: jnp.sin(x) + 0.1, p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1))
    before = [x.sharding for x in jax.tree.leaves((placed, state))]
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # "Some donated buffers were not usable"
      for _ in range(3):
        placed, state = compiled(placed, state)
    after = [x.sharding for x in jax.tree.leaves((placed, state))]
    moved = [(i, a, b) for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert not moved, (name, moved)
    assert compiled._cache_size() == 1, (name, compiled._cache_size())
    print(name, "kept its placement; one compilation")
print("OK")
