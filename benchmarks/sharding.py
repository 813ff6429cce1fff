"""Clipped Adam step sharded over 8 forced CPU devices vs unsharded, and the bytes the
threshold search communicates per step, read from the compiled HLO's collectives.

Claim (issue: scale out): threshold communication <= 1 KiB per step regardless of model size.

Usage: python -m benchmarks.sharding   (sets 8 host devices itself)
"""

import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import optclip  # noqa: E402
from benchmarks.timing import time_ms  # noqa: E402
from optclip import sharding  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "bf16": 2, "s64": 8,
                "f64": 8, "u8": 1, "s8": 1}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|"
                         r"collective-permute|all-to-all)(-start)?\(")


def _computations(hlo: str) -> dict:
  """HLO text -> {computation name: its lines}."""
  blocks, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      blocks[name.lstrip("%")] = []
    elif name is not None:
      blocks[name.lstrip("%")].append(line)
  return blocks


def _line_bytes(line: str) -> int:
  match = _COLLECTIVE.search(line)
  if not match:
    return 0
  size = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
    elements = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    size += elements * _DTYPE_BYTES.get(dtype, 4)
  return size


def collective_bytes(hlo: str):
  """(bytes outside loops, bytes inside loop bodies, collective count) of an HLO module.

  Collectives in a while body (and the computations it calls: both branches of a
  conditional) are summed as an upper bound of what one iteration communicates.
  """
  blocks = _computations(hlo)
  callees = {name: set(re.findall(r"(?:body|condition|branch_computations|to_apply|calls)="
                                  r"\{?%?([\w.\-]+(?:, %[\w.\-]+)*)", "\n".join(lines)))
             for name, lines in blocks.items()}
  callees = {name: {c.strip().lstrip("%") for group in groups for c in group.split(",")}
             for name, groups in callees.items()}
  in_loop = set()
  frontier = [m for lines in blocks.values() for line in lines
              for m in re.findall(r"body=%?([\w.\-]+)", line)]
  while frontier:
    name = frontier.pop()
    if name not in in_loop:
      in_loop.add(name)
      frontier.extend(callees.get(name, ()))
  outside = inside = count = 0
  for name, lines in blocks.items():
    for line in lines:
      size = _line_bytes(line)
      if size:
        count += 1
        if name in in_loop:
          inside += size
        else:
          outside += size
  return outside, inside, count


def search_passes(grads) -> int:
  """Loop iterations (narrowing passes) of the threshold search at fraction 0.5; the summary
  pass before the loop counts with the collectives outside it."""
  from optclip import clipping
  _, passes, _ = jax.jit(lambda g: clipping._threshold_values(g, 0.5, False))(grads)
  return int(passes)


def tree(params: int, leaves: int, seed=0):
  rng = np.random.default_rng(seed)
  rows = params // leaves // 256
  return [jnp.asarray(rng.standard_t(3, size=(rows, 256)).astype(np.float32))
          for _ in range(leaves)]


def main():
  mesh = sharding.mesh_from_spec("fsdp=8")
  print(f"devices: {len(jax.devices())} × {jax.devices()[0].device_kind}")
  for params_count, leaves in ((1 << 20, 16), (1 << 23, 32), (1 << 25, 64)):
    grads = tree(params_count, leaves)
    n = sum(g.size for g in grads)
    with jax.set_mesh(mesh):
      sharded = sharding.shard_params(grads, mesh, min_size=0)
      threshold = jax.jit(lambda g: optclip.clip_threshold(g, 0.5))
      hlo = threshold.lower(sharded).compile().as_text()
      outside, inside, count = collective_bytes(hlo)
      steps = search_passes(sharded)
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
    per_step = outside + inside * steps
    print(f"{n / 1e6:5.1f}M params in {leaves} leaves: threshold collectives: {count} ops; "
          f"{outside} B outside the loop + {inside} B per iteration x {steps} iterations = "
          f"{per_step} B per step (goal <= 1024 B); identical to unsharded: {same}")
    print(f"   clipped Adam step: sharded {sharded_ms:.1f} ms vs unsharded {plain_ms:.1f} ms "
          f"(ratio {sharded_ms / plain_ms:.2f}; 8 CPU 'devices' share 2 cores)")


if __name__ == "__main__":
  main()
