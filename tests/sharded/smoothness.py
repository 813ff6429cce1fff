"""Table 8's Gauss-Newton measurement (`experiments.sections.smoothness`) of the smoke BERT on
a data=2,fsdp=4 mesh of 8 CPU devices, every leaf FSDP-sharded, against the same measurement
unsharded (run by tests/test_sharding.py: JAX fixes the device count at start-up). The
planner found it crashing on a mesh: per-example gradients of sharded weights contracted
over their sharded axis."""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import presets, tasks  # noqa: E402
from experiments.sections import smoothness  # noqa: E402
from optclip import sharding  # noqa: E402

preset = presets.SMOKE
task = tasks.build("classification", preset, 0, cache_dir=tempfile.mkdtemp())
mesh = sharding.mesh_from_spec(sys.argv[1] if len(sys.argv) > 1 else "data=2,fsdp=4")
# Five micro-batches of the 25 test examples (the paper preset's classification.microbatch_size).
microbatch_size = 5
# All parameters: a superset of the attention weights, and half the compile time of both.
SUBSETS = ("all",)


def measured(mesh):
  """Every subset's and ratio's result on ``mesh`` (or None), as NumPy."""
  context, place, place_batch = sharding.placement(mesh, min_size=0)  # every leaf split
  with context:
    params = place(task.init_params(0))
    if mesh is not None:
      assert sum(sharding.explicit_spec(x) is not None
                 for x in jax.tree.leaves(params)) > len(jax.tree.leaves(params)) // 2
    _, measure = smoothness._compiled(task.model, microbatch_size, task.preset.remat, mesh)
    batch = place_batch(task.test_batch)
    return {subset: jax.tree.map(np.asarray, measure(params, batch, subset))
            for subset in SUBSETS}


plain, sharded = measured(None), measured(mesh)
fields = 0
for subset in SUBSETS:
  for ratio, want, got in zip(smoothness.RATIOS, plain[subset], sharded[subset]):
    for name, value in want._asdict().items():
      label = f"{subset} {ratio}x {name}"
      if name == "removed_per_leaf":  # counts per leaf
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, label),
                     getattr(got, name), value)
      else:
        np.testing.assert_allclose(getattr(got, name), value, rtol=1e-4, err_msg=label)
      fields += 1
print(fields, "fields equal")
print("OK")
