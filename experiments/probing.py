"""Runs the trajectory units the probe experiments share, and reads their records back."""

from __future__ import annotations

import collections

import numpy as np

from experiments import trajectory
from experiments.variants import by_label

TRANSFORMER_TASKS = ("translation", "code")
KNOWN = by_label(v for probes in trajectory.PROBES.values() for v in probes)
PAPER_LABELS = {kind: [v.label for v in probes]
                for kind, probes in trajectory.PAPER_PROBES.items()}


def run_transformer_units(ctx) -> None:
  for task_name in TRANSFORMER_TASKS:
    for seed in ctx.seeds:
      task = ctx.task(task_name, seed)
      for name in trajectory.TRAJECTORIES:
        trajectory.run(ctx, task, name, seed)


def is_probe(record, kind=None) -> bool:
  return (record["experiment"] == trajectory.EXPERIMENT and record["key"].endswith("/probe")
          and (kind is None or record["kind"] == kind))


def is_trajectory(record) -> bool:
  return record["experiment"] == trajectory.EXPERIMENT


def grouped(records, kind="transformer"):
  """{(task, trajectory): {epoch: [probe record per seed, in seed order]}}."""
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in sorted(trajectory.probe_records(records, kind=kind), key=lambda r: r["seed"]):
    out[(r["task"], r["trajectory"])][r["epoch"]].append(r)
  return out


def values(record, field="sharpness") -> dict:
  """{label: the record's ``field`` for that direction}, as float64."""
  return dict(zip(record["algorithms"], np.asarray(record[field], np.float64)))


def sgd_reference(record) -> tuple:
  """SGD's sharpness as the ratios' denominator, and whether it is Eq. 4's shifted value.

  As in the paper (Appendix B.3): SGD's raw value, unless it is negative; then its value at
  x + δu/‖u‖ (Eq. 4), marked wherever it is used.
  """
  raw = values(record)["sgd"]
  return (raw, False) if raw > 0 else (values(record, "sharpness_robust")["sgd"], True)


def ratios(record) -> dict:
  """{label: raw sharpness / SGD's (see `sgd_reference`)}; SGD's own is 1 by definition,
  also where its shifted value is the reference (the paper's SGD rows are all 1)."""
  reference, _ = sgd_reference(record)
  out = {name: value / reference for name, value in values(record).items()}
  out["sgd"] = 1.0
  return out


def unclipped_pairs(labels):
  """(unclipped, clipped-gradient) label pairs among the paper's variants in ``labels``."""
  paper = {label for labels_ in PAPER_LABELS.values() for label in labels_}
  pairs = []
  for label in labels:
    variant = KNOWN[label]
    if label in paper and variant.clip is not None and variant.unclipped.label in labels:
      pairs.append((variant.unclipped.label, label))
  return pairs
