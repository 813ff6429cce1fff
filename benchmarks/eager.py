"""Un-jitted optimizer updates, as the README's logging loop runs them.

Claim (issue: a library people can install): an eager ``optclip.adam(1e-3, clip=0.5)``
update is within 3x an eager ``optax.adam(1e-3)`` update (it once compiled the clip's
statistics afresh at every call, 60x slower). Ratios are taken round by round.

Usage: python -m benchmarks.eager [--rounds 15] [--steps 20]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from benchmarks.timing import interleaved_ms, median_ratio


def mlp(seed: int = 0):
  """The 49-parameter MLP of the issue: 4 -> 8 -> 1 with biases."""
  rng = np.random.default_rng(seed)
  shapes = {"w1": (4, 8), "b1": (8,), "w2": (8, 1), "b2": (1,)}
  draw = lambda: {k: jnp.asarray(rng.standard_t(3, v), jnp.float32) for k, v in shapes.items()}
  return draw(), draw()


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  params, grads = mlp()
  optimizers = {"optax.adam": optax.adam(1e-3), "optclip.adam clip=0.5":
                optclip.adam(1e-3, clip=0.5),
                "coord_clip(0.5) + optax.adam": optax.chain(optclip.coord_clip(0.5),
                                                            optax.adam(1e-3))}
  states = {name: tx.init(params) for name, tx in optimizers.items()}

  def steps(name):
    tx, state = optimizers[name], states[name]
    for _ in range(args.steps):
      updates, state = tx.update(grads, state, params)
    return updates

  times = interleaved_ms({name: (lambda n=name: steps(n)) for name in optimizers},
                         rounds=args.rounds)
  base = times["optax.adam"]
  for name, t in times.items():
    print(f"{name:32s} {np.median(t) / args.steps:8.3f} ms/update   "
          f"{median_ratio(t, base):5.2f}x optax.adam")
  ratio = median_ratio(times["optclip.adam clip=0.5"], base)
  print(f"claim: eager clipped Adam <= 3x eager optax.adam: {ratio:.2f}x "
        f"{'holds' if ratio <= 3 else 'FAILS'}")


if __name__ == "__main__":
  main()
