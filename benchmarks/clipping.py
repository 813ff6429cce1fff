"""Threshold search and clipped Adam step at 10M coordinates, as ratios measured in one run.

Claims (issue: foundation): clip_threshold >= 30x faster than jnp.quantile on the concatenated
vector; one jitted optclip.adam(1e-3, clip=0.5) step <= 3x one optax.adam(1e-3) step; the
clipped step allocates no full-size temporary beyond optax.adam's plus O(one leaf).

Usage: python -m benchmarks.clipping [--coords 10000000] [--leaves 100]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from benchmarks.timing import interleaved_ms, median_ratio, time_ms


def make_tree(coords: int, leaves: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = coords // leaves // 100
  # Heavy-tailed, like transformer gradients (Figure 1 of the paper).
  return [jnp.asarray(rng.standard_t(3, size=(rows, 100)).astype(np.float32) * 1e-3)
          for _ in range(leaves)]


def _compiled(update, *args, clip_statistics: bool = True):
  """``jax.jit(update)`` compiled for ``args``; without ``clip_statistics`` the clip's
  statistics pass is traced as "keep the previous state" (the clipped step as it was before
  the statistics existed), to measure what they cost."""
  from optclip import clipping
  saved = clipping._clip_statistics_compiled
  if not clip_statistics:
    clipping._clip_statistics_compiled = lambda tree, threshold, finite, like, per_leaf: like
  try:
    return jax.jit(update).lower(*args).compile()
  finally:
    clipping._clip_statistics_compiled = saved


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--coords", type=int, default=10_000_000)
  parser.add_argument("--leaves", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  tree = make_tree(args.coords, args.leaves)
  n = sum(l.size for l in tree)
  print(f"{n:,} float32 coordinates in {len(tree)} leaves, devices: {jax.devices()}")

  quantile = jax.jit(lambda t: jnp.quantile(
      jnp.concatenate([jnp.abs(l).ravel() for l in t]), 0.9, method="higher"))
  t_quantile = time_ms(quantile, tree, repeats=2)
  print(f"jnp.quantile on the concatenated vector: {t_quantile:9.1f} ms")
  for fraction in (0.1, 0.5, 0.01):
    threshold = jax.jit(lambda t, f=fraction: optclip.clip_threshold(t, f))
    t_threshold = time_ms(threshold, tree, repeats=args.repeats)
    print(f"clip_threshold(fraction={fraction}):        {t_threshold:9.1f} ms   "
          f"speed-up vs quantile {t_quantile / t_threshold:6.1f}x (goal >= 30x)")

  # Warm start: last step's τ (here: that of another draw of the same distribution, as from
  # one step to the next) as the hint. Reads of |g|: the first pass, the narrowing passes,
  # and the cold search's sample (a strided gather, about a pass's time).
  from optclip import clipping
  search = jax.jit(clipping._threshold_values, static_argnums=(1, 2))
  previous = optclip.clip_threshold(make_tree(args.coords, args.leaves, 1), 0.5)
  for label, hint in (("cold", None), ("warm", jnp.asarray([previous], jnp.float32))):
    t_search = time_ms(search, tree, 0.5, False, hint, repeats=args.repeats)
    passes = int(search(tree, 0.5, False, hint)[1])
    print(f"clip_threshold(fraction=0.5), {label}:    {t_search:9.1f} ms   "
          f"{passes} narrowing passes + first pass" + (" + sample" if hint is None else ""))

  params = [jnp.zeros_like(l) for l in tree]
  steps, temps = {}, {}
  for name, tx in [("optax.adam(1e-3)", optax.adam(1e-3)),
                   ("optclip.adam(1e-3)", optclip.adam(1e-3)),
                   ("optclip.adam(1e-3, clip=0.5)", optclip.adam(1e-3, clip=0.5)),
                   ("  same, first step (cold search)", optclip.adam(1e-3, clip=0.5)),
                   ("  same, no clip statistics", optclip.adam(1e-3, clip=0.5)),
                   ("optclip.adam(1e-3, clip_update=0.5)", optclip.adam(1e-3, clip_update=0.5))]:
    state = tx.init(params)
    step = _compiled(tx.update, tree, state, clip_statistics="no clip statistics" not in name)
    # Two earlier steps on other gradients: after one step Adam's direction m̂/√v̂ is ±1
    # everywhere, which would make the clip_update search trivial.
    # They also leave last step's τ in the clip's state, which warm-starts the search (the
    # steady state); "first step" keeps the initial state, τ = inf: the cold search.
    for seed in (1, 2) if "first step" not in name else ():
      state = step(make_tree(args.coords, args.leaves, seed), state)[1]
    steps[name] = functools.partial(step, tree, state)
    temps[name] = int(step.memory_analysis().temp_size_in_bytes)
  rounds = interleaved_ms(steps, max(args.repeats, 7))
  base = rounds["optax.adam(1e-3)"]
  leaf_bytes = tree[0].size * 4
  for name, times in rounds.items():
    print(f"{name:38s} {np.median(times):8.1f} ms  ratio {median_ratio(times, base):5.2f}x   "
          f"temporaries {temps[name] / 2**20:7.1f} MiB (extra vs optax.adam: "
          f"{(temps[name] - temps['optax.adam(1e-3)']) / leaf_bytes:+.2f} leaves)")
  print("goal: clipped step <= 3x optax.adam (aim 1.5x steady state); extra temporaries O(one "
        "leaf); clip statistics within noise")


if __name__ == "__main__":
  main()
