"""Directional sharpness of K directions in one call vs K separate HVP calls; landscape cost.

Claims (issue: geometry): K = 8 directions in one call >= 1.5x faster (aim 2x) than 8 separate
jvp-of-grad calls, on an MLP and a small transformer; landscape of 8 directions x 32 steps
<= 1.2x the cost of the same number of batched forward passes.

Usage: python -m benchmarks.geometry
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from benchmarks.timing import temp_bytes, time_ms

K = 8


def mlp(seed=0, width=512, depth=4, batch=256):
  rng = np.random.default_rng(seed)
  dims = [64] + [width] * depth + [10]
  params = [{"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
             "b": jnp.zeros(b)} for a, b in zip(dims[:-1], dims[1:])]
  x = jnp.asarray(rng.standard_normal((batch, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))

  def loss(p):
    h = x
    for layer in p[:-1]:
      h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ p[-1]["w"] + p[-1]["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss, params


def transformer(seed=0, vocab=2000, d=128, layers=2, seq=64, batch=8):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32)
  params = {"emb": normal(vocab, d), "pos": normal(seq, d),
            "blocks": [{"qkv": normal(d, 3 * d), "out": normal(d, d), "up": normal(d, 4 * d),
                        "down": normal(4 * d, d), "g1": jnp.ones(d), "g2": jnp.ones(d)}
                       for _ in range(layers)]}
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)))
  heads = 4

  def norm(h, g):
    return h / jnp.sqrt(jnp.mean(h ** 2, -1, keepdims=True) + 1e-6) * g

  def loss(p):
    h = p["emb"][tokens] + p["pos"]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    for blk in p["blocks"]:
      q, k, v = jnp.split(norm(h, blk["g1"]) @ blk["qkv"], 3, -1)
      split = lambda t: t.reshape(batch, seq, heads, d // heads).transpose(0, 2, 1, 3)
      q, k, v = split(q), split(k), split(v)
      att = jnp.where(mask, q @ k.swapaxes(-1, -2) / np.sqrt(d // heads), -1e9)
      o = (jax.nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, d)
      h = h + o @ blk["out"]
      h = h + jax.nn.gelu(norm(h, blk["g2"]) @ blk["up"]) @ blk["down"]
    logits = h @ p["emb"].T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                                    tokens[:, 1:]))
  return loss, params


def directions(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((K,) + p.shape), jnp.float32), params)


def bench_sharpness(name, loss, params):
  dirs = directions(params)
  n = sum(p.size for p in jax.tree.leaves(params))
  # Parameters are arguments, not closed-over constants: XLA would otherwise fold the primal
  # computation into the compiled programs and time something no training run has.
  hvp_one = jax.jit(lambda p, u: optclip.geometry.tree_dot(
      u, jax.jvp(jax.grad(loss), (p,), (u,))[1]) / optclip.geometry.tree_dot(u, u))
  singles = [jax.tree.map(lambda d: d[i], dirs) for i in range(K)]
  baseline = time_ms(lambda: [hvp_one(params, u) for u in singles])
  print(f"\n{name} ({n:,} parameters), K = {K} directions")
  print(f"  {K} separate jvp-of-grad calls               {baseline:8.1f} ms   1.00x")
  for method, batch_size in [("forward", "auto"), ("forward", None), ("jet", 1),
                             ("jet", None), ("hvp", 1)]:
    call = jax.jit(lambda p, d, m=method, b=batch_size: optclip.directional_sharpness(
        loss, p, d, method=m, batch_size=b))
    ms = time_ms(call, params, dirs)
    mib = temp_bytes(call, params, dirs) / 2**20
    label = f"{method}, batch_size={batch_size!r}"
    print(f"  directional_sharpness({label:26s}) {ms:8.1f} ms  {baseline / ms:5.2f}x faster"
          f"   temporaries {mib:7.1f} MiB")
  print("  (goal: the default, forward with batch_size='auto', >= 1.5x)")
def bench_landscape(name, loss, params, steps=32):
  dirs = directions(params)
  step_sizes = jnp.linspace(0, 1e-2, steps)
  grid = jax.jit(lambda p, d: optclip.landscape(loss, p, d, step_sizes))
  # Baseline: the same K * S forward passes, batched, at points computed beforehand.
  scales = jnp.tile(step_sizes, K)
  points = jax.tree.map(
      lambda p, d: p[None] + scales.reshape((-1,) + (1,) * p.ndim) * jnp.repeat(d, steps, 0),
      params, dirs)
  batched_forward = jax.jit(jax.vmap(loss))
  t_grid = time_ms(grid, params, dirs, repeats=3)
  t_forward = time_ms(batched_forward, points, repeats=3)
  print(f"  landscape {K} x {steps}: {t_grid:8.1f} ms vs {K * steps} batched forward passes "
        f"{t_forward:8.1f} ms  ratio {t_grid / t_forward:5.2f} (goal <= 1.2)")


def model_family(preset, batch=8, length=32):
  """One of our models (T5, GPT-Neo, BERT, ResNet) with its loss on a random batch."""
  import optclip.models as models
  model = models.create(preset)
  params = models.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  if preset.startswith("resnet"):
    data = {"pixels": jnp.asarray(rng.standard_normal((batch, 16, 16, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, batch))}
  else:
    ids = jnp.asarray(rng.integers(4, model.config.vocab_size, (batch, length)), jnp.int32)
    data = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    data["label" if preset.startswith("bert") else "labels"] = (
        jnp.asarray(rng.integers(0, 2, batch)) if preset.startswith("bert") else ids)
  loss_fn = models.make_loss_fn(model)
  return (lambda p: loss_fn(p, data)), params


def main():
  print(f"devices: {jax.devices()}")
  cases = [("MLP 4x512 tanh, batch 256", mlp),
           ("MLP 2x128 relu-like (tanh), batch 64", lambda: mlp(width=128, depth=2, batch=64)),
           ("transformer 2x128, batch 8x64", transformer),
           ("transformer 4x64, batch 4x32", lambda: transformer(d=64, layers=4, seq=32,
                                                                batch=4))]
  cases += [(f"{preset} (ours), batch 8", lambda p=preset: model_family(p))
            for preset in ("t5-tiny", "gpt-neo-tiny", "bert-tiny", "resnet-tiny")]
  for name, make in cases:
    loss, params = make()
    bench_sharpness(name, loss, params)
  for name, make in cases[:1] + cases[2:3]:
    loss, params = make()
    bench_landscape(name, loss, params)


if __name__ == "__main__":
  main()
