"""Table 9: directional sharpness ratios on a ResNet in the SGD trajectory."""

from __future__ import annotations

import numpy as np

from experiments import probing
from experiments.artifacts.tables import bootstrap_interval, mean_std, write_table
from experiments.paper import values as paper_values
from experiments.paper.claims import verdict
from experiments.probing import trajectory
from experiments.setup.experiment import Experiment

NAME = "resnet"


def run(ctx) -> None:
  for seed in ctx.seeds:
    task = ctx.task("images", seed)
    trajectory.run(ctx, task, "sgd", seed, kind="resnet", epochs=ctx.preset.resnet_epochs,
                   probe_epochs=ctx.preset.resnet_probe_epochs)


def write(out: str, records):
  groups = probing.grouped(records, "resnet")
  if not groups:
    return None
  rows, adam = [], []
  paper_epochs = sorted(paper_values.TABLE9)
  for (task, traj), by_epoch in sorted(groups.items()):
    for position, (epoch, runs) in enumerate(sorted(by_epoch.items())):
      paper_epoch = paper_epochs[position] if position < len(paper_epochs) else None
      for name in runs[0]["algorithms"]:
        mean, std = mean_std([probing.ratios(r)[name] for r in runs])
        rows.append([epoch, name, mean, std, paper_epoch or "",
                     paper_values.TABLE9.get(paper_epoch, {}).get(name, "")])
      adam += [probing.ratios(r)["adam"] for r in runs]
  table = write_table(out, "resnet_sharpness", ["epoch", "algorithm", "ratio to SGD",
                                                       "std", "paper epoch", "paper ratio"], rows)
  verdicts = []
  transformer = [probing.ratios(r)["adam"] for by_epoch in probing.grouped(records).values()
                 for runs in by_epoch.values() for r in runs]
  if adam:
    median = float(np.median(adam))
    reference = float(np.median(transformer)) if transformer else float("nan")
    status = ("reproduced" if median >= 1 else
              "partly reproduced" if median >= 3 * reference else "not reproduced")
    low, high = bootstrap_interval(adam, np.median)
    paper = float(np.median([row["adam"] for row in paper_values.TABLE9.values()]))
    verdicts.append(verdict("resnet", status, RULE,
                            f"median Adam/SGD ratio {median:.3g} on the ResNet vs "
                            f"{reference:.3g} on the transformers",
                            value=f"median Adam/SGD {median:.3g} [{low:.3g}, {high:.3g}]",
                            paper=f"median Adam/SGD {paper:.3g} (Table 9)"))
  return "### ResNet, SGD trajectory (Table 9)\n\n" + table, verdicts


RULE = ("median Adam/SGD sharpness ratio over the ResNet's probe points: reproduced if >= 1 "
        "(the paper's are O(1), up to 4.8), partly if at least 3x the transformers' median, "
        "else not reproduced")


EXPERIMENT = Experiment(NAME, "Table 9: directional sharpness on a ResNet", run, write,
                        probing.is_probe, ("tables/resnet_sharpness",), ("images",),
                        needs=("sharpness",))
