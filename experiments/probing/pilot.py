"""The trajectory learning rates where a preset gives a grid (the scaled-down presets): the
paper's rate (2e-4, Appendix B.3) barely moves the tiny models, so each task's trajectory
takes the smallest rate of the grid at which it visibly trains — its probe-batch loss falls
by at least DROP over the trajectory's epochs — a criterion fixed before any run.

The pilot trains the followed optimizer alone (no probes ride along), every rate of the grid
in one compiled program, on the first seed's task; where no rate meets the criterion the
largest is taken and the record says so. Models with state (the ResNet's BatchNorm) run
the pilot on the training-mode loss.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.probing.probes import PROBE_MOMENTUM_START, SGD_FAMILY
from experiments.training import loop, sweep
from experiments.training.variants import Variant

EXPERIMENT = "pilot"
DROP = 0.05


@functools.lru_cache(maxsize=None)
def _programs(model, trajectory: str, microbatch_size: int, remat: str, mesh):
  options = {"momentum_start": PROBE_MOMENTUM_START} if trajectory in SGD_FAMILY else {}
  return sweep.programs(loop.model_objective(model, mesh, "train", microbatch_size, remat),
                        Variant(trajectory).make(1.0, tunable=True, **options))


def chosen_rate(rates, start, final) -> tuple:
  """(the smallest rate whose loss fell by at least DROP, whether one did)."""
  for rate, before, after in sorted(zip(rates, start, final)):
    if np.isfinite(after) and after <= (1 - DROP) * before:
      return rate, True
  return max(rates), False


def learning_rate(ctx, task_name: str, trajectory: str, *, kind: str, epochs: int,
                  model_name: str | None = None) -> float:
  """The trajectory's rate: the preset's number, or the pilot's choice from its grid (on
  the first seed's task, whichever unit asks first)."""
  grid = ctx.preset.trajectory_learning_rates[trajectory]
  if not isinstance(grid, (list, tuple)):
    return float(grid)
  key = "/".join([EXPERIMENT, kind, task_name] + ([model_name] if model_name else [])
                 + [trajectory])
  if not ctx.metrics.has(key):
    seed = ctx.seeds[0]
    task = ctx.task(task_name, seed)
    rates = [float(r) for r in grid]
    curves = sweep.train_copies(
        _programs(task.model, trajectory, task.preset.microbatch_size, task.preset.remat,
                  ctx.mesh), task.init_params,
        lambda s: task.train, [sweep.Run(rate, seed) for rate in rates], epochs=epochs,
        batch_size=task.batch_size, evaluate_of=lambda s: task.test_batch)
    rate, met = chosen_rate(rates, curves.start_loss, curves.final_loss)
    ctx.metrics.log(EXPERIMENT, key, kind=kind, task=task.name, trajectory=trajectory,
                    seed=seed, **({"model": model_name} if model_name else {}),
                    rates=rates, start_loss=curves.start_loss, final_loss=curves.final_loss,
                    chosen=rate, criterion_met=met, drop=DROP, epochs=epochs)
  return ctx.metrics.get(key)["chosen"]
