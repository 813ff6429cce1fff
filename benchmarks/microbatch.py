"""What micro-batching costs per example: one-shot against micro-batched programs.

Claim (issue: paper scale): micro-batching costs <= 10% time per example against the one-
shot program at equal batch where both fit, on the quick models (t5-mini, gpt-neo-mini):
the gradient (the train step's core) and the probe's forward-mode second derivative, with
4 micro-batches of the same batch. Ratios are taken round by round in one run.

Usage: python -m benchmarks.microbatch [--batch 64] [--rounds 9]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import optclip.models as models
from benchmarks.timing import interleaved_ms, median_ratio
from optclip import geometry

MODELS = {"t5-mini": dict(vocab_size=384),
          "gpt-neo-mini": dict(vocab_size=384, max_position_embeddings=32)}


def batch_of(size: int, length: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(1, vocab, (size, length)), jnp.int32)
  lengths = rng.integers(length // 2, length + 1, size)  # padding differs between examples
  mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
  return {"input_ids": ids, "attention_mask": mask, "labels": jnp.where(mask > 0, ids, -100)}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--microbatches", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args(argv)
  size = args.batch // args.microbatches
  for name, overrides in MODELS.items():
    model = models.create(name, **overrides)
    params = models.init_params(model, jax.random.PRNGKey(0))
    batch = batch_of(args.batch, 24, overrides["vocab_size"])
    direction = jax.tree.map(lambda p: jnp.ones_like(p) * 1e-2, params)
    calls = {}
    for label, mb in (("one-shot", 0), (f"{args.microbatches} micro-batches", size)):
      objective = models.make_objective(model, "eval", mb)
      grad = jax.jit(objective.value_and_grad)
      second = jax.jit(lambda p, u, b, o=objective: o.apply(
          lambda f: geometry.second_derivative(f, p, u, "auto"), b))
      calls[f"gradient, {label}"] = lambda g=grad: g(params, batch)
      calls[f"second derivative, {label}"] = lambda s=second: s(params, direction, batch)
    times = interleaved_ms(calls, rounds=args.rounds)
    print(f"{name}: batch {args.batch}, micro-batches of {size}")
    for program in ("gradient", "second derivative"):
      one = times[f"{program}, one-shot"]
      many = times[f"{program}, {args.microbatches} micro-batches"]
      ratio = median_ratio(many, one)
      print(f"  {program:18s} one-shot {np.median(one):7.2f} ms, micro-batched "
            f"{np.median(many):7.2f} ms: {ratio:.3f}x "
            f"({'within' if ratio <= 1.10 else 'OVER'} the 10% claim)")


if __name__ == "__main__":
  main()
