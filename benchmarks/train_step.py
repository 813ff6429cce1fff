"""What coordinate-wise clipping costs on a whole training step, not the optimizer alone.

Claim (issue: clipping at the cost of one read): a jitted train step (forward, backward,
optimizer, donated state) with optclip.adam(lr, clip=0.5) costs <= 5% more than with
optax.adam(lr), on t5-small and GPT-Neo-125M (their real sizes, random weights) at a
batch of real sequence length: by default the paper preset's micro-batch of each model's
task (translation 32, code 8 sequences; `experiments/presets.py`), the most one pass of the
paper's steps takes. The steady state: a few steps taken first, so the clip's state holds
last step's τ and warm-starts the search. Ratios are taken round by round.

The paper's optimizer step follows a whole batch (translation 1024 = 32 micro-batches, code
1000 = 125), and the clip runs once per step whatever the batch, so the line also states
the overhead extrapolated to that batch: the clip's extra time over that many micro-batches'
plain steps (an upper bound: each micro-batch past the first needs no optimizer update).

Usage: python -m benchmarks.train_step [--batch N] [--rounds 5] [--models t5-small,gpt-neo-125M]
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
import optclip.models as models
from benchmarks.timing import interleaved_ms, median_ratio

LENGTHS = {"t5-small": 128, "gpt-neo-125M": 256}  # the paper's sequence lengths (B.1)
# (micro-batch, whole batch) of the paper preset's translation and code steps
PAPER_BATCHES = {"t5-small": (32, 1024), "gpt-neo-125M": (8, 1000)}


def batch_of(size: int, length: int, vocab: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(1, vocab, (size, length)), jnp.int32)
  return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=None,
                      help="sequences per step (default the paper preset's micro-batch)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--models", default="t5-small,gpt-neo-125M")
  args = parser.parse_args(argv)
  for name in args.models.split(","):
    micro, whole = PAPER_BATCHES.get(name, (4, None))
    size = args.batch or micro
    model = models.create(name)
    params = models.init_params(model, jax.random.PRNGKey(0))
    loss_fn = models.make_loss_fn(model)
    vocab = model.config.vocab_size
    count = sum(x.size for x in jax.tree.leaves(params))
    calls = {}
    for label, tx in (("optax.adam", optax.adam(1e-4)),
                      ("optclip.adam(clip=0.5)", optclip.adam(1e-4, clip=0.5))):
      def step(params, state, batch, tx=tx):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

      compiled = jax.jit(step, donate_argnums=(0, 1))
      carry = [jax.tree.map(jnp.copy, params), tx.init(params)]
      for seed in (1, 2):  # the steady state: τ of the last step in the clip's state
        carry[:2] = compiled(*carry, batch_of(size, LENGTHS.get(name, 32), vocab, seed))[:2]
      batch = batch_of(size, LENGTHS.get(name, 32), vocab, 0)

      def call(compiled=compiled, carry=carry, batch=batch):
        carry[:2] = compiled(*carry, batch)[:2]  # donated: the next call takes the result
        return carry[0]
      calls[label] = call
    times = interleaved_ms(calls, rounds=args.rounds)
    base = times["optax.adam"]
    ratio = median_ratio(times["optclip.adam(clip=0.5)"], base)
    line = (f"{name} ({count / 1e6:.1f}M parameters), batch {size} x {LENGTHS.get(name, 32)} "
            f"tokens: optax.adam {np.median(base):.0f} ms, optclip.adam(clip=0.5) "
            f"{np.median(times['optclip.adam(clip=0.5)']):.0f} ms per step: {ratio:.3f}x "
            f"({'within' if ratio <= 1.05 else 'OVER'} the 5% claim)")
    if whole is not None:  # a model of the paper's: its whole batch is known
      passes = math.ceil(whole / size)  # of this size in the paper's whole batch
      line += (f"; at the paper's batch of {whole} ({passes} passes of {size}) at most "
               f"{100 * (ratio - 1) / passes:+.2f}%")
    print(line)


if __name__ == "__main__":
  main()
