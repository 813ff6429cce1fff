"""Seed 002's statistic: R_med = max|H_ii| / median|H_ii| of the test-batch Hessian diagonal
(Hutchinson estimate) along the SGD and Adam trajectories, on both transformer tasks and the
ResNet."""

from __future__ import annotations

import numpy as np

from experiments import paper_values, probing
from experiments.tables import mean_std, write_table

NAME = "rmed"


def write(out: str, records):
  if not any(probing.is_probe(r) for r in records):
    return None
  rows, verdicts = [], []
  for kind in ("transformer", "resnet"):
    for (task, traj), by_epoch in sorted(probing.grouped(records, kind).items()):
      for epoch, runs in sorted(by_epoch.items()):
        mean, std = mean_std([r["r_med"] for r in runs])
        rows.append([task, traj, epoch, mean, std])
  table = write_table(out, "rmed", ["task", "trajectory", "epoch", "R_med (mean)",
                                           "std"], rows)
  for task in sorted({r[0] for r in rows}):
    by_traj = {t: np.mean([r[3] for r in rows if r[0] == task and r[1] == t])
               for t in ("sgd", "adam") if any(r[0] == task and r[1] == t for r in rows)}
    if len(by_traj) == 2:
      verdicts.append(f"{paper_values.CLAIMS['rmed']} — {task}: "
                      f"**{'reproduced' if by_traj['adam'] < by_traj['sgd'] else 'not reproduced'}**"
                      f" (mean R_med Adam {by_traj['adam']:.3g} vs SGD {by_traj['sgd']:.3g})")
  return ("### R_med along the trajectories (seed 002)\n\nHutchinson estimate of the "
          "Hessian diagonal on the fixed test batch.\n\n" + table), verdicts
