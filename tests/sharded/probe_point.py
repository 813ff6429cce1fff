"""A whole probe point (every measurement of `experiments.probing.measurements`) of the smoke
GPT-Neo on a data=2,fsdp=4 mesh of 8 CPU devices, every leaf FSDP-sharded, against the same
point unsharded (run by tests/test_sharding.py: JAX fixes the device count at start-up)."""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import presets, tasks  # noqa: E402
from experiments.probing import measurements, trajectory  # noqa: E402
from experiments.probing.probes import train_transform  # noqa: E402
from experiments.training import loop  # noqa: E402
from optclip import sharding  # noqa: E402

preset = presets.SMOKE
task = tasks.build("code", preset, 0, cache_dir=tempfile.mkdtemp())
mesh = sharding.mesh_from_spec(sys.argv[1] if len(sys.argv) > 1 else "data=2,fsdp=4")


def point(mesh):
  """The record of one probe point after one training step, on ``mesh`` (or None)."""
  context, place, place_batch = sharding.placement(mesh, min_size=0)  # every leaf split
  with context:
    step, directions = trajectory.steps(task, "transformer", preset, mesh, "sgd")
    programs = trajectory._programs(task, "transformer", preset, mesh)
    tx = train_transform("sgd", 1e-2, "transformer")
    names = list(tx.probes)
    params = task.init_params(0)
    state = loop.initial_state(tx, params, place)
    if mesh is not None:
      assert sum(sharding.explicit_spec(x) is not None
                 for x in jax.tree.leaves(state.params)) > len(jax.tree.leaves(params)) // 2
    batches = task.epoch_batches(0, 1)
    state = step(state, place_batch(next(batches)))[0]
    stacked, clip_statistics = directions(state, place_batch(next(batches)))
    inputs = dict(params=state.params, directions=stacked, names=names,
                  probe_batch=trajectory.probe_batch(place_batch(task.test_batch), state),
                  key=jax.random.PRNGKey(0),
                  sample=trajectory.curvature_sample(params, preset.curvature_samples, 0),
                  diagonal_here=True, first_point=True,
                  adam_preconditioner=trajectory._adam_preconditioner(
                      state.opt_state.probes["adam"]),
                  clip_statistics=clip_statistics)
    return jax.tree.map(np.asarray, measurements.measure(programs, inputs, preset))


plain, sharded = point(None), point(mesh)
flat_plain = jax.tree_util.tree_flatten_with_path(plain)[0]
flat_sharded = dict((jax.tree_util.keystr(p), v)
                    for p, v in jax.tree_util.tree_flatten_with_path(sharded)[0])
assert len(flat_plain) == len(flat_sharded)

RTOL = 1e-3  # the mesh reorders sums (Adafactor's factored statistics, the attribution)
# A coordinate the mesh moves by the relative RTOL moves log10 |u| by at most
# log10(1 + RTOL), far less than a bin, so it can only cross into the next bin, and only if it
# lies that close to an edge: counts may move between neighbours, never appear or vanish.
# Bound the moved ones by that band's share of all coordinates (two sides of each edge).
BIN_WIDTH = (measurements.HISTOGRAM_RANGE[1] - measurements.HISTOGRAM_RANGE[0]) / \
    measurements.HISTOGRAM_BINS
EDGE_BAND = 2 * np.log10(1 + RTOL) / BIN_WIDTH


def assert_counts_close(got, value, name):
  got, value = np.asarray(got), np.asarray(value)
  assert got.sum() == value.sum(), name
  moved = np.abs(np.cumsum(got) - np.cumsum(value)).max()
  assert moved <= max(1, np.ceil(EDGE_BAND * value.sum())), (name, got, value)


for path, value in flat_plain:
  name = jax.tree_util.keystr(path)
  got = flat_sharded[name]
  if name.startswith("['histograms']") and name.endswith("[0]"):
    assert_counts_close(got, value, name)
  elif np.asarray(value).dtype.kind in "fc":
    np.testing.assert_allclose(got, value, rtol=RTOL, atol=1e-6 * (np.nanmax(np.abs(value))
                                                                    if np.size(value) else 1),
                               err_msg=name)
  else:
    np.testing.assert_array_equal(got, value, err_msg=name)
print(len(flat_plain), "fields equal")
print("OK")
