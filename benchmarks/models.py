"""Our Flax T5 / GPT-Neo train step vs transformers' PyTorch train step, same batch, same CPU
threads; and the input pipeline's throughput against the train step's consumption rate.

Claims (issue: models and data): JAX/PyTorch step-time ratio <= 1.0; the quick preset's input
pipeline produces batches >= 20x faster than the train step consumes them.

Usage: python -m benchmarks.models [--sizes tiny small] [--threads 2]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip.models as models
from benchmarks.timing import time_ms

CASES = {  # (our preset, batch, source length, target length)
    "t5-tiny": ("t5-tiny", 16, 32, 32), "t5-small": ("t5-small", 8, 64, 64),
    "gpt-neo-tiny": ("gpt-neo-tiny", 16, 64, 0), "gpt-neo-125M": ("gpt-neo-125M", 4, 128, 0),
}


def _batch(name, config, batch, src, tgt, rng):
  ids = rng.integers(4, config.vocab_size, size=(batch, src)).astype(np.int32)
  if name.startswith("t5"):
    labels = rng.integers(4, config.vocab_size, size=(batch, tgt)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}


def jax_step_ms(model, params, batch, repeats):
  """Median time of a training loop's step as the experiments run it
  (`experiments.training.loop.train_step`): state carried and donated, as PyTorch updates in
  place (without donation every step also allocates fresh parameter and moment buffers)."""
  from experiments.training import loop
  tx = optax.adamw(1e-4)
  step = loop.train_step(models.make_loss_fn(model), tx)
  carried = [loop.initial_state(tx, params)]
  batch = jax.tree.map(jnp.asarray, batch)

  def run():
    carried[0], loss = step(carried[0], batch)
    return loss
  return time_ms(run, repeats=repeats, warmup=2)


def torch_step_ms(folder, batch, repeats):
  import torch
  import transformers
  import json
  arch = json.load(open(os.path.join(folder, "config.json")))["architectures"][0]
  model = getattr(transformers, arch).from_pretrained(folder)
  model.train()
  for module in model.modules():  # no dropout, as ours
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  inputs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
  for _ in range(2):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append((time.perf_counter() - start) * 1e3)
  return sorted(times)[len(times) // 2]


def pipeline_ratio():
  from experiments import presets, tasks
  from optclip.data.batching import prefetch
  task = tasks.build("translation", presets.QUICK, 0)
  params = task.init_params(0)
  batch = next(task.epoch_batches(0, 0))
  step_ms = jax_step_ms(task.model, params, batch, repeats=5)
  start, count = time.perf_counter(), 0
  for epoch in range(20):
    for _ in prefetch(task.epoch_batches(0, epoch)):
      count += 1
  produce_ms = (time.perf_counter() - start) * 1e3 / count
  return step_ms, produce_ms


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", nargs="+", default=list(CASES))
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  import tempfile
  import torch
  torch.set_num_threads(args.threads)
  print(f"devices: {jax.devices()}, torch threads: {torch.get_num_threads()}")
  rng = np.random.default_rng(0)
  for case in args.cases:
    preset, batch_size, src, tgt = CASES[case]
    model = models.create(preset)
    params = models.init_params(model, jax.random.PRNGKey(0))
    batch = _batch(case, model.config, batch_size, src, tgt, rng)
    with tempfile.TemporaryDirectory() as folder:
      models.save_pretrained(folder, model, params)
      ours = jax_step_ms(model, params, batch, args.repeats)
      theirs = torch_step_ms(folder, batch, args.repeats)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{case:14s} {count / 1e6:7.2f}M params, batch {batch_size}: JAX {ours:8.1f} ms, "
          f"PyTorch {theirs:8.1f} ms, ratio JAX/PyTorch {ours / theirs:5.2f} (goal <= 1.0)")
  step_ms, produce_ms = pipeline_ratio()
  print(f"quick translation pipeline: {produce_ms:.3f} ms per batch vs train step "
        f"{step_ms:.1f} ms: {step_ms / produce_ms:.0f}x faster than consumption (goal >= 20x)")


if __name__ == "__main__":
  main()
