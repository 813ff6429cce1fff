"""Beyond the paper: preconditioned sharpness at the edge of stability (Cohen et al. 2022).

λ_max(P⁻¹H), P = √v̂ + ε of the Adam probe's live state, beside Adam's stability threshold
(2 + 2β₁)/((1 − β₁)η) along the Adam trajectory; λ_max(H) beside the SGD trajectory's
threshold. Our SGD has an exponential-moving-average momentum (β = dampening = 0.9), which
is heavy-ball SGD at rate (1 − β)η: its threshold is the same (2 + 2β)/((1 − β)η) = 38/η.
"""

from __future__ import annotations

import collections

import numpy as np

from experiments import probing
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import write_table
from experiments.paper.claims import BeyondClaim, verdict
from experiments.probing import trajectory
from experiments.setup.experiment import Experiment
from optclip import curvature

NAME = "preconditioned"
BETA = 0.9  # Adam's β₁ and the SGD probes' momentum = dampening
CLAIM = BeyondClaim(
    "Adam's preconditioned sharpness λ_max(P⁻¹H) rises to its stability threshold "
    "(2 + 2β₁)/((1 − β₁)η) and hovers there",
    "Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability, arXiv 2207.14484")
RULE = ("along the Adam trajectory of the transformer tasks, at every probe point after the "
        "first: λ_max(P⁻¹H) η(1 − β₁)/(2 + 2β₁) within [0.5, 2]; reproduced if so at >= 75% "
        "of those points, partly if at >= 25%, else not reproduced")


def threshold(trajectory_name: str, learning_rate: float) -> float:
  """The stability threshold of the trajectory's optimizer at its rate."""
  if trajectory_name == "adam":
    return curvature.adam_stability_threshold(learning_rate, BETA)
  # EMA momentum: heavy-ball at rate (1 - β)η.
  return curvature.sgd_stability_threshold((1 - BETA) * learning_rate, BETA)


def _rates(records) -> dict:
  """{(kind, task, trajectory, seed): the unit's learning rate}."""
  return {(r["kind"], r["task"], r["trajectory"], r["seed"]): r["learning_rate"]
          for r in records if probing.is_trajectory(r) and r["key"].endswith("/start")
          and "model" not in r}


def write(out: str, records):
  rates = _rates(records)
  # (kind, task, trajectory) -> epoch -> [(sharpness / its threshold) per seed]
  ratios = collections.defaultdict(lambda: collections.defaultdict(list))
  rows = []
  for kind in ("transformer", "resnet"):
    for (task, traj), by_epoch in sorted(probing.grouped(records, kind).items()):
      for epoch, runs in sorted(by_epoch.items()):
        runs = [r for r in runs if r.get("preconditioned_sharpness") is not None
                and (kind, task, traj, r["seed"]) in rates]
        if not runs:
          continue
        rate = float(np.median([rates[(kind, task, traj, r["seed"])] for r in runs]))
        # The followed optimizer's own sharpness: P⁻¹H for Adam, H for SGD.
        field = "preconditioned_sharpness" if traj == "adam" else "lambda_max"
        values = [r[field] / threshold(traj, rates[(kind, task, traj, r["seed"])])
                  for r in runs]
        ratios[(kind, task, traj)][epoch] = values
        rows.append([kind, task, traj, epoch, rate,
                     float(np.median([r["lambda_max"] for r in runs])),
                     float(np.median([r["preconditioned_sharpness"] for r in runs])),
                     threshold(traj, rate), float(np.median(values))])
  if not rows:
    return None
  table = write_table(out, "preconditioned_sharpness",
                      ["kind", "task", "trajectory", "epoch", "η (median)", "λ_max(H)",
                       "λ_max(P⁻¹H)", "threshold", "followed sharpness / threshold"], rows)
  fig, ax = new_figure(figsize=(6.5, 4))
  for (kind, task, traj), by_epoch in sorted(ratios.items()):
    epochs = sorted(by_epoch)
    ax.plot(epochs, [np.median(by_epoch[e]) for e in epochs], marker="o",
            linestyle="-" if traj == "adam" else "--",
            label=f"{task} ({kind}), {traj}: " + ("λ_max(P⁻¹H)" if traj == "adam" else
                                                   "λ_max(H)"))
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("sharpness / stability threshold")
  ax.legend(fontsize=7)
  save_figure(fig, figure_path(out, "preconditioned_sharpness"))
  near = [0.5 <= value <= 2.0
          for (kind, _, traj), by_epoch in ratios.items() if kind == "transformer"
          and traj == "adam" for epoch in sorted(by_epoch)[1:] for value in by_epoch[epoch]]
  if not near:
    status, evidence, value = "inconclusive", "no Adam trajectory past its first probe point", ""
  else:
    share = float(np.mean(near))
    status = ("reproduced" if share >= 0.75 else "partly reproduced" if share >= 0.25 else
              "not reproduced")
    adam = [v for (kind, _, traj), by_epoch in ratios.items() if kind == "transformer"
            and traj == "adam" for epoch in sorted(by_epoch)[1:] for v in by_epoch[epoch]]
    evidence = (f"{sum(near)}/{len(near)} Adam-trajectory points within a factor 2 of the "
                f"threshold; median ratio {np.median(adam):.3g}")
    value = f"{share:.0%} of points near; median ratio {np.median(adam):.3g}"
  return ("### Preconditioned sharpness at the edge of stability (beyond the paper)\n\n"
          "λ_max(P⁻¹H) with Adam's live P = √v̂ + ε (the Adam probe's state; on the Adam "
          "trajectory the optimizer that trains) and λ_max(H), both by Lanczos on the probe "
          "batch; the last column divides the followed optimizer's own sharpness by its "
          "stability threshold (38/η for both: Adam's (2 + 2β₁)/((1 − β₁)η), and SGD with "
          "EMA momentum 0.9). Figure: `figures/preconditioned_sharpness.png`.\n\n" + table), [
              verdict(CLAIM, status, RULE, evidence, value=value,
                      paper="≈ 1 after progressive sharpening (Cohen et al., full batch)")]


EXPERIMENT = Experiment(NAME, "beyond the paper: λ_max(P⁻¹H) against Adam's stability "
                        "threshold", trajectory.run_transformer_units, write,
                        probing.is_trajectory, ("tables/preconditioned_sharpness",
                                                "figures/preconditioned_sharpness"),
                        trajectory.TRANSFORMER_TASKS, in_reproduce=False,
                        needs=("preconditioned_sharpness", "lambda_max"))
