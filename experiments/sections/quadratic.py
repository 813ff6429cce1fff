"""The introduction's example: f(x) = xᵀAx with A₁₁ = 100 and A_ii = 1 otherwise.

Gradient descent must keep η < 1/100 because of the first coordinate; clipping that coordinate
(or Adam's coordinate-wise scaling) allows a much larger step on the others. Each optimizer
gets the best learning rate of a small grid (the paper tunes learning rates too, Table 3), and
we report its loss curve.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path, table_path
from experiments.paper.claims import verdict
from experiments.setup.experiment import Experiment, records_of


@dataclasses.dataclass(frozen=True)
class QuadraticConfig:
  dim: int = 100
  sharp_curvature: float = 100.0
  steps: int = 100
  seed: int = 0
  learning_rates: tuple = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
  clip_fraction: float = 0.1  # the paper's fraction for SGD


def objective(config: QuadraticConfig):
  diag = jnp.ones((config.dim,)).at[0].set(config.sharp_curvature)
  return lambda x: jnp.sum(diag * x * x)


def optimizers(config: QuadraticConfig):
  return {
      "sgd": lambda lr: optclip.sgd(lr, momentum=0.0),
      f"sgd, clip {config.clip_fraction:g}": lambda lr: optclip.sgd(
          lr, momentum=0.0, clip=config.clip_fraction),
      "adam": lambda lr: optclip.adam(lr),
  }


def loss_curve(loss_fn, tx, x0, steps: int) -> np.ndarray:
  @jax.jit
  def run(x0):
    def step(carry, _):
      x, state = carry
      loss, grad = jax.value_and_grad(loss_fn)(x)
      updates, state = tx.update(grad, state, x)
      return (optax.apply_updates(x, updates), state), loss
    (x, _), losses = jax.lax.scan(step, (x0, tx.init(x0)), None, length=steps)
    return jnp.append(losses, loss_fn(x))
  return np.asarray(run(x0))


def best_curves(config: QuadraticConfig = QuadraticConfig()) -> dict:
  """Returns {optimizer: {"learning_rate": best, "losses": curve}}."""
  loss_fn = objective(config)
  x0 = jax.random.normal(jax.random.key(config.seed), (config.dim,))
  results = {}
  for name, make in optimizers(config).items():
    best = None
    for lr in config.learning_rates:
      curve = loss_curve(loss_fn, make(lr), x0, config.steps)
      final = curve[-1] if np.isfinite(curve[-1]) else np.inf
      if best is None or final < best[1]:
        best = (lr, final, curve)
    results[name] = {"learning_rate": best[0], "losses": best[2].tolist()}
  return results


def table(results: dict, every: int = 10) -> str:
  names = list(results)
  steps = len(next(iter(results.values()))["losses"])
  header = "| step | " + " | ".join(f"{n} (lr {results[n]['learning_rate']:g})" for n in names)
  lines = [header + " |", "|" + "---|" * (len(names) + 1)]
  for t in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
    lines.append(f"| {t} | " + " | ".join(f"{results[n]['losses'][t]:.3e}" for n in names) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  fig, ax = new_figure(figsize=(6, 4))
  for name, r in results.items():
    ax.semilogy(r["losses"], label=f"{name} (lr {r['learning_rate']:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("f(x) = xᵀAx")
  ax.set_title("Quadratic with one sharp coordinate (A₁₁ = 100)")
  ax.legend()
  save_figure(fig, path)


NAME = "quadratic"
RULE = ("each optimizer at the best rate of the grid for its loss after 100 steps; reproduced "
        "if clipped SGD's loss after 10 steps is below SGD's")


def run(ctx) -> None:
  """One record per optimizer (the best of the learning-rate grid)."""
  for seed in ctx.seeds:
    config = QuadraticConfig(seed=seed)
    for name, result in best_curves(config).items():
      ctx.metrics.log(NAME, f"quadratic/seed{seed}/{name}", seed=seed, algorithm=name,
                      learning_rate=result["learning_rate"], losses=result["losses"])


def write(out: str, records):
  if not records:
    return None
  first = min(r["seed"] for r in records)
  results = {r["algorithm"]: {"learning_rate": r["learning_rate"], "losses": r["losses"]}
             for r in records if r["seed"] == first}
  plot(results, figure_path(out, "quadratic"))
  markdown = table(results)
  with open(table_path(out, "quadratic", "md"), "w") as f:
    f.write(markdown + "\n")
  final = {n: r["losses"][10] for n, r in results.items()}
  clipped = next(n for n in final if "clip" in n)
  status = "reproduced" if final[clipped] < final["sgd"] else "not reproduced"
  line = verdict("quadratic", status, RULE,
                 f"loss after 10 steps: SGD {final['sgd']:.3g}, {clipped} {final[clipped]:.3g}, "
                 f"Adam {final['adam']:.3g}",
                 value=f"loss at step 10: clipped {final[clipped]:.3g} vs SGD {final['sgd']:.3g}",
                 paper="clipped SGD converges in a few steps")
  return ("### The introduction's quadratic (A₁₁ = 100)\n\nFigure: `figures/quadratic.png`."
          "\n\n" + markdown), [line]


EXPERIMENT = Experiment("quadratic", "the introduction's f(x) = xᵀAx example", run, write,
                        records_of(NAME), ("tables/quadratic.md", "figures/quadratic.png"))
