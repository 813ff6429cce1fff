"""The loss of every trajectory at its start and at every probe point (on the probe batch),
and whether the trajectories visibly train: the criterion the quick preset's learning
rates were chosen by."""

from __future__ import annotations

import collections

from experiments import probing
from experiments.artifacts.tables import mean_std, write_table
from experiments.probing import pilot
from experiments.setup.experiment import on_probe_units

NAME = "losses"
DROP = pilot.DROP  # "visibly trains": the probe-batch loss falls by at least 5% over the run


def write(out: str, records):
  losses = collections.defaultdict(dict)  # (kind, task, model, trajectory, seed) -> {epoch: loss}
  rates = {}
  for r in records:
    if not probing.is_trajectory(r) or "kind" not in r:
      continue
    unit = (r["kind"], r["task"], r.get("model", ""), r["trajectory"], r["seed"])
    if r["key"].endswith("/start"):
      losses[unit][0] = r["probe_loss"]
      rates[unit[:4]] = r["learning_rate"]
    elif r["key"].endswith("/probe"):
      losses[unit][r["epoch"]] = r["loss"]
  if not losses:
    return None
  rows, trained, total = [], 0, 0
  for key in sorted({unit[:4] for unit in losses}):
    units = {unit: curve for unit, curve in losses.items() if unit[:4] == key}
    epochs = sorted({e for curve in units.values() for e in curve})
    for epoch in epochs:
      mean, std = mean_std([curve.get(epoch) for curve in units.values()])
      rows.append([*key, rates.get(key, ""), epoch, mean, std])
    for curve in units.values():
      if 0 in curve and len(curve) > 1:
        total += 1
        trained += curve[max(curve)] <= (1 - DROP) * curve[0]
  table = write_table(out, "trajectory_losses", ["kind", "task", "model", "trajectory",
                                                 "learning rate", "epoch",
                                                 "probe-batch loss (mean)", "std"], rows)
  pilots = [[r["kind"], r["task"], r.get("model", ""), r["trajectory"], rate, before, after,
             "chosen" + ("" if r["criterion_met"] else " (none fell enough: the largest)")
             if rate == r["chosen"] else ""]
            for r in records if r["experiment"] == pilot.EXPERIMENT
            for rate, before, after in zip(r["rates"], r["start_loss"], r["final_loss"])]
  pilot_table = ("\n\nThe pilot that chose the rates (experiments.probing.pilot): the followed "
                 "optimizer alone over the trajectory's epochs, on the first seed.\n\n"
                 + write_table(out, "trajectory_pilot", ["kind", "task", "model", "trajectory",
                                                         "rate", "probe-batch loss, start",
                                                         "probe-batch loss, end", ""], pilots)
                 if pilots else "")
  return (f"### Trajectory losses\n\nThe probe-batch loss of every trajectory at its start "
          f"(epoch 0) and at every probe point. {trained} of {total} trajectories fell by at "
          f"least {DROP:.0%} from start to last probe point, the criterion the trajectory "
          f"learning rates are chosen by.\n\n" + table + pilot_table), []


EXPERIMENT = on_probe_units(NAME, "the trajectories' probe-batch losses at every probe point",
                            write, ("tables/trajectory_losses",), ("first_order",),
                            reads=lambda r: (probing.is_trajectory(r)
                                             or r["experiment"] == pilot.EXPERIMENT))
