"""Runs the trajectory units the probe experiments share, and reads their records back."""

from __future__ import annotations

import collections

import numpy as np

from experiments import trajectory

TRANSFORMER_TASKS = ("translation", "code")
TRAJECTORIES = ("sgd", "adam")


def run_transformer_units(ctx) -> None:
  for task_name in TRANSFORMER_TASKS:
    for seed in ctx.seeds:
      task = ctx.task(task_name, seed)
      for name in TRAJECTORIES:
        trajectory.run(task, name, seed, ctx.preset, ctx.out, ctx.metrics,
                       mesh=ctx.mesh)


def grouped(records, kind="transformer"):
  """{(task, trajectory): {epoch: [probe record per seed]}}."""
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in trajectory.probe_records(records, kind=kind):
    out[(r["task"], r["trajectory"])][r["epoch"]].append(r)
  return out


def ratios(record) -> dict:
  sharp = dict(zip(record["algorithms"], np.asarray(record["sharpness"], np.float64)))
  base = sharp["sgd"]
  return {name: value / base for name, value in sharp.items()}


def unclipped_pairs(algorithms):
  """(unclipped, clipped-gradient) name pairs present in ``algorithms``."""
  pairs = []
  for name in algorithms:
    if ", clip grad" in name:
      base = name.split(",")[0]
      if base in algorithms:
        pairs.append((base, name))
  return pairs
