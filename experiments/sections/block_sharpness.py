"""Beyond the paper: directional sharpness split over parameter blocks (embedding, query/key,
value/output, MLP, norm, head). For every probe direction u and block b, u_bᵀ∇²f u_b/‖u‖²
with u_b the part of u on b's leaves; the rest of uᵀ∇²f u is the blocks' cross terms. Which
blocks carry SGD's sharpness, and does clipping lower it there (Section 4's attribution by
named block; Zhang et al. 2024 on the blocks' heterogeneity)?"""

from __future__ import annotations

import numpy as np

from experiments import presets, probing
from experiments.artifacts.tables import bootstrap_interval, write_table
from experiments.paper.claims import BeyondClaim, NotRun, verdict
from experiments.setup.experiment import on_probe_units

NAME = "block_sharpness"
CLAIM = BeyondClaim(
    "SGD's directional sharpness sits in few parameter blocks, and clipping lowers it there",
    "Pan & Li's Section 4 attribution by named block; Zhang et al. 2024, arXiv 2402.16788 "
    "(the Hessian's blocks are heterogeneous)")
SHOWN = presets.BLOCK_SHARPNESS_COMPARED  # first in the table
COMPARED = SHOWN[:2]  # what the verdict reads
KINDS = ("embedding", "query/key", "value/output", "mlp", "norm", "head", "convolution",
         "other")
RULE = ("over every transformer probe point: the share of SGD's Σ_b |u_bᵀHu_b| in its "
        "largest block, and whether SGD clipped at 10% has a smaller |u_bᵀHu_b|/‖u‖² than "
        "SGD in that block; reproduced if the median share is >= 0.5 and clipping lowers the "
        "largest block at >= 75% of points, partly if one of the two holds")


def _split(record, name):
  """(blocks, u_bᵀHu_b/‖u‖² per block, cross share) of direction ``name``."""
  split = record["block_sharpness"]
  index = split["directions"].index(name)
  return (split["blocks"], np.asarray(split["diagonal"][index], np.float64),
          float(split["cross_share"][index]))


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups or not any("block_sharpness" in r for by_epoch in groups.values()
                           for runs in by_epoch.values() for r in runs):
    return None
  present = {b for by_epoch in groups.values() for runs in by_epoch.values() for r in runs
             for b in r["block_sharpness"]["blocks"]}
  columns = [kind for kind in KINDS if kind in present] + sorted(present - set(KINDS))
  rows, shares, lowered = [], [], []
  for (task, traj), by_epoch in sorted(groups.items()):
    runs = [r for epoch_runs in by_epoch.values() for r in epoch_runs]
    measured = list(dict.fromkeys(n for r in runs for n in r["block_sharpness"]["directions"]))
    # the four the verdict compares first, then every other update the preset split
    for name in [n for n in SHOWN if n in measured] + [n for n in measured if n not in SHOWN]:
      split = [_split(r, name) for r in runs if name in r["block_sharpness"]["directions"]]
      by_block = lambda block: [values[blocks.index(block)] for blocks, values, _ in split
                                if block in blocks]
      rows.append([task, traj, name, len(split),
                   *[float(np.median(by_block(b))) if by_block(b) else float("nan")
                     for b in columns], float(np.median([cross for *_, cross in split]))])
    for r in runs:
      if not set(COMPARED) <= set(r["block_sharpness"]["directions"]):
        continue
      _, sgd, _ = _split(r, COMPARED[0])
      _, clipped, _ = _split(r, COMPARED[1])
      magnitude = np.abs(sgd)
      top = int(np.argmax(magnitude))
      shares.append(magnitude[top] / magnitude.sum() if magnitude.sum() > 0 else np.nan)
      lowered.append(abs(clipped[top]) < abs(sgd[top]))
  table = write_table(out, "block_sharpness",
                      ["task", "trajectory", "direction", "probe points",
                       *[f"{b} (median)" for b in columns], "cross share (median)"], rows)
  text = ("### Directional sharpness by parameter block (beyond the paper)\n\n"
          "u_bᵀ∇²f u_b/‖u‖² per block b (the part u_b of each direction on the block's leaves), "
          "median over seeds and probe points; the cross share is 1 − Σ_b u_bᵀ∇²f u_b / "
          "uᵀ∇²f u, what the blocks' interactions carry.\n\n" + table)
  if not shares:
    return text, [NotRun(NAME, f"block_sharpness_directions without {COMPARED[0]!r} and "
                               f"{COMPARED[1]!r}")]
  share, low = float(np.nanmedian(shares)), float(np.mean(lowered))
  interval = bootstrap_interval(np.asarray(shares)[np.isfinite(shares)], np.median)
  status = ("reproduced" if share >= 0.5 and low >= 0.75 else
            "partly reproduced" if share >= 0.5 or low >= 0.75 else "not reproduced")
  return text, [verdict(CLAIM, status, RULE,
                        f"SGD's largest block carries a median {share:.0%} of Σ_b |u_bᵀHu_b|; "
                        f"clipping at 10% lowers that block at {low:.0%} of points",
                        value=f"largest block {share:.0%} [{interval[0]:.0%}, "
                              f"{interval[1]:.0%}]; lowered at {low:.0%}")]


EXPERIMENT = on_probe_units(NAME, "beyond the paper: directional sharpness by parameter block",
                            write, ("tables/block_sharpness",), ("block_sharpness",))
