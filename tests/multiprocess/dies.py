"""One of two processes joined the way `python -m experiments ... --mesh` joins them
(experiments.__main__._initialize_distributed, from JAX_COORDINATOR_ADDRESS and friends),
summing over a mesh that spans both, step after step; process 1 dies after the first step
(run by tests/test_multiprocess.py)."""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.__main__ import _initialize_distributed  # noqa: E402

assert _initialize_distributed()
mesh = jax.make_mesh((4,), ("data",))
ones = jax.make_array_from_process_local_data(
    jax.sharding.NamedSharding(mesh, jax.P("data")), np.ones(2, np.float32))
total = jax.jit(jnp.sum)
print(f"process {jax.process_index()}: step 0 sums {float(total(ones))}", flush=True)
if jax.process_index() == 1:
  os._exit(3)  # dies without a word, as a killed process would
for step in range(1, 1000):
  time.sleep(0.2)
  total(ones).block_until_ready()
print("process 0 was never stopped", flush=True)
