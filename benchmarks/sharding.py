"""Clipped Adam step sharded over 8 forced CPU devices vs unsharded, and the bytes the
threshold search communicates per step, read from the compiled HLO's collectives.

Claim (issue: scale out): threshold communication <= 1 KiB per step regardless of model size.

Usage: python benchmarks/sharding.py   (sets 8 host devices itself)
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optclip  # noqa: E402
from common import time_ms  # noqa: E402
from optclip import sharding  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "bf16": 2, "s64": 8,
                "f64": 8, "u8": 1, "s8": 1}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|"
                         r"collective-permute|all-to-all)(-start)?\(")


def collective_bytes(hlo: str):
  """(bytes, count) of the collectives' results in an HLO module, per execution of each op
  (ops inside a while body count once per iteration; we report them separately)."""
  total, count, in_loop = 0, 0, 0
  computation = ""
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      computation = line
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    size = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      elements = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      size += elements * _DTYPE_BYTES.get(dtype, 4)
    total += size
    count += 1
    in_loop += size if ("body" in computation or "while" in computation) else 0
  return total, count, in_loop


def tree(params: int, leaves: int, seed=0):
  rng = np.random.default_rng(seed)
  rows = params // leaves // 256
  return [jnp.asarray(rng.standard_t(3, size=(rows, 256)).astype(np.float32))
          for _ in range(leaves)]


def main():
  mesh = sharding.mesh_from_spec("fsdp=8")
  print(f"devices: {len(jax.devices())} × {jax.devices()[0].device_kind}")
  for params_count, leaves in ((1 << 20, 16), (1 << 23, 32)):
    grads = tree(params_count, leaves)
    n = sum(g.size for g in grads)
    with jax.set_mesh(mesh):
      sharded = sharding.shard_params(grads, mesh, min_size=0)
      threshold = jax.jit(lambda g: optclip.clip_threshold(g, 0.5))
      hlo = threshold.lower(sharded).compile().as_text()
      total, count, loop = collective_bytes(hlo)
      steps = 8 if n <= (1 << 20) else None  # passes of the compact 16-ary search
      tx = optclip.adam(1e-3, clip=0.5)
      state = tx.init(sharded)
      step = jax.jit(lambda g, s: tx.update(g, s, g))
      sharded_ms = time_ms(step, sharded, state, repeats=3)
      exact = float(threshold(sharded))
    tx = optclip.adam(1e-3, clip=0.5)
    state = tx.init(grads)
    step = jax.jit(lambda g, s: tx.update(g, s, g))
    plain_ms = time_ms(step, grads, state, repeats=3)
    same = exact == float(jax.jit(lambda g: optclip.clip_threshold(g, 0.5))(grads))
    # Upper bound: every collective in the module counted once per pass.
    per_step = (f"{total} B in the module; at most {total * steps} B per step ({steps} passes)"
                if steps else f"{total} B in the module per search step (the search runs a "
                "data-dependent number of steps, typically 3-6)")
    print(f"{n / 1e6:5.1f}M params in {leaves} leaves: threshold collectives: {count} ops, "
          f"{per_step}; threshold identical to unsharded: {same}")
    print(f"   clipped Adam step: sharded {sharded_ms:.1f} ms vs unsharded {plain_ms:.1f} ms "
          f"(ratio {sharded_ms / plain_ms:.2f}; 8 CPU 'devices' share 2 cores)")


if __name__ == "__main__":
  main()
