"""Runs the trajectory units the probe experiments share, and reads their records back."""

from __future__ import annotations

import collections

import numpy as np

from experiments import trajectory
from experiments.variants import by_label

TRANSFORMER_TASKS = ("translation", "code")


def run_transformer_units(ctx) -> None:
  for task_name in TRANSFORMER_TASKS:
    for seed in ctx.seeds:
      task = ctx.task(task_name, seed)
      for name in trajectory.TRAJECTORIES:
        trajectory.run(ctx, task, name, seed)


def is_probe(record, kind=None) -> bool:
  return (record["experiment"] == trajectory.EXPERIMENT and record["key"].endswith("/probe")
          and (kind is None or record["kind"] == kind))


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


def unclipped_pairs(labels):
  """(unclipped, clipped-gradient) label pairs present in ``labels``."""
  known = by_label(v for probes in trajectory.PROBES.values() for v in probes)
  pairs = []
  for label in labels:
    variant = known[label]
    if variant.clip is not None and variant.unclipped.label in labels:
      pairs.append((variant.unclipped.label, label))
  return pairs
