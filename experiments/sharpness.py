"""Table 1 and Tables 4-7: directional sharpness of every algorithm's pseudo-update, as raw
values and as ratios to SGD, mean ± std over seeds, for both tasks and both trajectories."""

from __future__ import annotations

import numpy as np

from experiments import paper_values, probing, trajectory
from experiments.tables import mean_std, write_table

NAME = "sharpness"


def write(out: str, records):
  groups = probing.grouped(records)
  if not groups:
    return None
  sections, verdicts = [], []
  for (task, traj), by_epoch in sorted(groups.items()):
    rows = []
    paper = paper_values.SHARPNESS_RATIO.get((task, traj), {})
    paper_epochs = sorted(paper)
    for position, epoch in enumerate(sorted(by_epoch)):
      runs = by_epoch[epoch]
      # our probe epochs are the paper's 2, 5, 10, 20 scaled: compare position by position
      paper_epoch = paper_epochs[position] if position < len(paper_epochs) else None
      for name in runs[0]["algorithms"]:
        ratio = [probing.ratios(r)[name] for r in runs]
        raw = [dict(zip(r["algorithms"], r["sharpness"]))[name] for r in runs]
        shifted = any(dict(zip(r["algorithms"], r["shifted"]))[name] for r in runs)
        mean, std = mean_std(ratio)
        paper_ratio = paper.get(paper_epoch, {}).get(name) if paper_epoch else None
        rows.append([epoch, name + (" †" if shifted else ""), mean_std(raw)[0], mean,
                     std, paper_epoch if paper_ratio is not None else "",
                     paper_ratio if paper_ratio is not None else ""])
    table = write_table(
        out, f"sharpness_{task}_{traj}",
        ["epoch", "algorithm", "sharpness (mean)", "ratio to SGD (mean)", "ratio std",
         "paper epoch", "paper ratio"], rows)
    sections.append(f"### Directional sharpness, {task}, {traj} trajectory\n\n"
                    "† = negative at x for some seed; evaluated at x + δu/‖u‖, δ = 0.01 "
                    "(Appendix B, Eq. 4).\n\n" + table)
  verdicts += _verdicts(groups)
  return "\n\n".join(sections), verdicts


def _verdicts(groups) -> list:
  lines = []
  for task in probing.TRANSFORMER_TASKS:
    ratios = [probing.ratios(r)["adam"] for traj in trajectory.TRAJECTORIES
              for runs in groups.get((task, traj), {}).values() for r in runs]
    if ratios:
      median = float(np.median(ratios))
      below = np.mean(np.asarray(ratios) < 1)
      status = "reproduced" if median < 0.1 and below > 0.75 else (
          "partly reproduced" if median < 1 else "not reproduced")
      lines.append(f"{paper_values.CLAIMS['adaptive_sharper']} — {task}: **{status}**, "
                   f"median Adam/SGD ratio {median:.3g} over {len(ratios)} probe points "
                   f"({below:.0%} below 1)")
  wins, total = 0, 0
  for by_epoch in groups.values():
    for runs in by_epoch.values():
      for r in runs:
        sharp = dict(zip(r["algorithms"], r["sharpness"]))
        for base, clipped in probing.unclipped_pairs(r["algorithms"]):
          total += 1
          wins += abs(sharp[clipped]) < abs(sharp[base])
  if total:
    share = wins / total
    status = "reproduced" if share >= 0.8 else ("partly reproduced" if share >= 0.5
                                                 else "not reproduced")
    lines.append(f"{paper_values.CLAIMS['clipping_helps']}: **{status}**, clipping lowered "
                 f"|sharpness| in {wins}/{total} (algorithm, probe point) pairs")
  return lines
