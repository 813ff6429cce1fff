"""Measures one compiled program's peak resident memory on the CPU beside the planner's
prediction (run by tests/test_plan.py in a process of its own).

Usage: python measure_rss.py BATCH_SIZE

The quick code task's trajectory train step (GPT-Neo with every probe optimizer riding
along) at BATCH_SIZE sequences: compiled first, the arguments placed, the kernel's peak-RSS
counter reset (/proc/self/clear_refs), then one call. Prints JSON: the planner's Memory and
the measured growth of resident memory during the call.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import optclip.models as models
from experiments import plan, presets
from experiments.probing import probes, trajectory
from experiments.training import loop


def resident(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  raise RuntimeError(field)


def main(batch_size: int) -> None:
  preset = presets.PRESETS["quick"]
  task = dataclasses.replace(preset.code, batch_size=batch_size, test_size=batch_size)
  preset = dataclasses.replace(preset, code=task)
  model, batch = plan.model_and_batch("code", preset)
  state = loop.initial_state(probes.train_transform("sgd", 0.1, "transformer"),
                             models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  real = {k: jnp.asarray(rng.integers(1, 100, v.shape), jnp.int32) for k, v in batch.items()}
  real["attention_mask"] = jnp.ones_like(real["attention_mask"])
  train_step, _ = trajectory.steps(plan._Fake(model, task), "transformer", preset, None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, real))
  memory = plan.compiled_memory(train_step, *abstract)
  compiled = train_step.lower(*abstract).compile()
  jax.block_until_ready((state, real))
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
  before = resident("VmRSS")
  jax.block_until_ready(compiled(state, real))
  print(json.dumps({**memory._asdict(), "peak": memory.peak,
                    "measured_growth": resident("VmHWM") - before}))


if __name__ == "__main__":
  main(int(sys.argv[1]))
