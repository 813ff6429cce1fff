"""Theorems 1-2 (Appendix A) checked numerically on quadratics f(x) = ½ xᵀHx with a diagonal
H whose ε-fraction of "bad" coordinates has curvature L and the rest at most ℓ. The gradient
g = Hx₀ is then concentrated on the bad coordinates. We measure the directional sharpness of
SGD (u = −g) and of clipped SGD (u = −clip(g, top-δ threshold), δ > ε) against the bound
√ε·L + ℓ, and the best one-step loss reduction (gᵀu)² / (2 uᵀHu) of each."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import optclip
from experiments import paper_values
from experiments.tables import mean_std, write_table

NAME = "theory"
SHARP, SMOOTH = 1000.0, 1.0
EPSILONS = (0.001, 0.01, 0.05)
DELTA_MULTIPLIERS = (2.0, 5.0, 10.0)


def measure(dim: int, epsilon: float, delta: float, seed: int) -> dict:
  rng = np.random.default_rng([seed, int(epsilon * 1e6), int(delta * 1e6)])
  bad = max(1, int(round(epsilon * dim)))
  curvature = np.concatenate([np.full(bad, SHARP), rng.uniform(0.1, SMOOTH, dim - bad)])
  gradient = curvature * rng.standard_normal(dim)
  f = lambda x: 0.5 * jnp.sum(jnp.asarray(curvature, jnp.float32) * x * x)
  x0 = jnp.zeros(dim, jnp.float32)
  results = {}
  for name, update in (("sgd", -gradient),
                       ("clipped sgd", -np.asarray(optclip.clip_to_threshold(
                           jnp.asarray(gradient, jnp.float32),
                           optclip.clip_threshold(jnp.asarray(gradient, jnp.float32), delta))))):
    update = np.asarray(update, np.float64)
    sharp = float(optclip.directional_sharpness(f, x0, jnp.asarray(update, jnp.float32)))
    quad = float(np.sum(curvature * update ** 2))
    results[name] = {"sharpness": sharp, "reduction": float(np.dot(gradient, update) ** 2 / (2 * quad))}
  return {"bound": float(np.sqrt(epsilon) * SHARP + SMOOTH), **results}


def run(ctx) -> None:
  for seed in ctx.seeds:
    for epsilon in EPSILONS:
      for multiplier in DELTA_MULTIPLIERS:
        delta = min(1.0, epsilon * multiplier)
        key = f"theory/seed{seed}/eps{epsilon:g}/delta{delta:g}"
        if not ctx.metrics.has(key):
          ctx.metrics.log(NAME, key, seed=seed, epsilon=epsilon, delta=delta,
                          L=SHARP, l=SMOOTH, **measure(ctx.preset.theory_dim, epsilon, delta, seed))


def write(out: str, records):
  if not records:
    return None
  rows = []
  for epsilon in EPSILONS:
    for delta in sorted({r["delta"] for r in records if r["epsilon"] == epsilon}):
      runs = [r for r in records if r["epsilon"] == epsilon and r["delta"] == delta]
      get = lambda a, f: mean_std([r[a][f] for r in runs])[0]
      rows.append([epsilon, delta, get("sgd", "sharpness"), get("clipped sgd", "sharpness"),
                   runs[0]["bound"], get("sgd", "reduction"), get("clipped sgd", "reduction")])
  table = write_table(out, "theory", ["ε", "δ (clip fraction)", "SGD sharpness",
                                             "clipped SGD sharpness", "√ε·L + ℓ",
                                             "SGD best reduction", "clipped best reduction"], rows)
  verdicts = []
  if rows:
    within = sum(r[3] <= r[4] for r in rows)
    better = sum(r[6] >= r[5] for r in rows)
    verdicts.append(f"{paper_values.CLAIMS['theory']}: "
                    f"**{'reproduced' if within == len(rows) else 'partly reproduced'}**, "
                    f"within the bound in {within}/{len(rows)} settings (SGD ≈ L = {SHARP:g}); "
                    f"clipping gave the larger one-step reduction in {better}/{len(rows)}")
  return f"### Theory check (Theorems 1-2), L = {SHARP:g}, ℓ ≤ {SMOOTH:g}\n\n" + table, verdicts
