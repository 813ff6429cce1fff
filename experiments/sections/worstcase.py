"""Section 3.1: directional against worst-case sharpness — the top Hessian eigenvalue λ_max
(Lanczos) beside every optimizer's directional sharpness at every probe point."""

from __future__ import annotations

import numpy as np

from experiments import probing
from experiments.artifacts.tables import mean_std, write_table
from experiments.paper.claims import verdict
from experiments.setup.experiment import on_probe_units

NAME = "worstcase"
RULE = ("every raw directional sharpness (every algorithm, probe point and seed) is at most "
        "λ_max(1 + 1e-3) (λ_max is a supremum; Lanczos can only underestimate it, so a "
        "violation would mean an error); reproduced if none exceeds it")


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  rows, exceeded, total = [], [], 0
  for (task, traj), by_epoch in sorted(groups.items()):
    for epoch, runs in sorted(by_epoch.items()):
      top = [r["lambda_max"] for r in runs]
      sharp = {n: [probing.values(r)[n] / r["lambda_max"] for r in runs]
               for n in ("sgd", "adam", "adafactor")}
      largest = [np.nanmax([probing.values(r)[n] for n in probing.PAPER_LABELS["transformer"]])
                 / r["lambda_max"] for r in runs]
      rows.append([task, traj, epoch, mean_std(top)[0], mean_std(sharp["sgd"])[0],
                   mean_std(sharp["adam"])[0], mean_std(sharp["adafactor"])[0],
                   float(np.max(largest))])
      for r in runs:
        for name, value in probing.values(r).items():
          total += 1
          if value > r["lambda_max"] * (1 + 1e-3):
            exceeded.append(f"{task}/{traj}/seed{r['seed']}/epoch{epoch}/{name}")
  table = write_table(out, "worst_case_sharpness",
                      ["task", "trajectory", "epoch", "λ_max (mean)", "SGD / λ_max",
                       "Adam / λ_max", "Adafactor / λ_max", "largest / λ_max"], rows)
  status = "reproduced" if not exceeded else "not reproduced"
  evidence = (f"{total - len(exceeded)}/{total} directions at or below λ_max"
              + (f"; above: {', '.join(exceeded[:5])}" if exceeded else ""))
  return ("### Directional vs worst-case sharpness (Section 3.1)\n\nλ_max of the probe-batch "
          "Hessian by Lanczos (preset `lanczos_iterations`), and each direction's raw "
          "directional sharpness as a fraction of it.\n\n" + table), [
              verdict("worst_case", status, RULE, evidence,
                      value=f"{total - len(exceeded)}/{total} at or below λ_max",
                      paper="all (λ_max is their supremum)")]


EXPERIMENT = on_probe_units(NAME, "Section 3.1: λ_max beside every directional sharpness",
                            write, ("tables/worst_case_sharpness",),
                            ("sharpness", "lambda_max"))
