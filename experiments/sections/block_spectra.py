"""Beyond the paper: the Hessian's block heterogeneity (Zhang et al. 2024). At each unit's
first probe point, the SLQ density of every parameter block's diagonal Hessian block (blocks
by kind: embedding, query/key, value/output, MLP, norm, head, convolution) and the mean
Jensen-Shannon distance between the blocks' densities (their JS⁰), per task, beside the
Adam/SGD directional-sharpness gap the paper explains Adam's advantage by."""

from __future__ import annotations

import collections

import numpy as np

from experiments import probing
from experiments.artifacts.figures import new_figure, save_figure
from experiments.artifacts.run_folder import figure_path
from experiments.artifacts.tables import bootstrap_interval, write_table
from experiments.paper.claims import BeyondClaim, verdict
from experiments.probing import trajectory
from experiments.setup.experiment import Experiment
from optclip import spectrum

NAME = "block_spectra"
CLAIM = BeyondClaim(
    "the Hessian's blocks are more heterogeneous in transformers than in a ResNet (JS⁰)",
    "Zhang et al. 2024, Why Transformers Need Adam: A Hessian Perspective, arXiv 2402.16788")
RULE = ("JS⁰ = the mean Jensen-Shannon distance between the blocks' smoothed SLQ densities "
        "(blocks by kind) at each unit's first probe point, median over units; reproduced if "
        "every transformer task's JS⁰ exceeds the ResNet's, partly if the transformer tasks' "
        "median does, not reproduced otherwise; inconclusive without a ResNet run")


def _probe_points(records) -> dict:
  """{(kind, task): every probe record of the task's units}."""
  out = collections.defaultdict(list)
  for kind in ("transformer", "resnet"):
    for (task, _), by_epoch in sorted(probing.grouped(records, kind).items()):
      for runs in by_epoch.values():
        out[(kind, task)] += runs
  return out


def write(out: str, records):
  points = _probe_points(records)
  rows, medians = [], {}
  for (kind, task), every in sorted(points.items()):
    runs = [r for r in every if r.get("block_spectra")]
    if not runs:
      continue
    js = [r["block_spectra"]["js_mean"] for r in runs]
    medians[(kind, task)] = float(np.median(js))
    gaps = [probing.ratios(r)["adam"] for r in every]
    low, high = bootstrap_interval(np.asarray(js), np.median)
    rows.append([kind, task, len(runs), ", ".join(runs[0]["block_spectra"]["blocks"]),
                 medians[(kind, task)], low, high,
                 float(np.median(gaps)) if gaps else float("nan")])
    _plot(out, kind, task, runs[0])
  if not rows:
    return None
  table = write_table(out, "block_spectra",
                      ["kind", "task", "units", "blocks", "JS⁰ (median)", "90% low",
                       "90% high", "Adam/SGD sharpness (median)"], rows)
  transformers = [v for (kind, _), v in medians.items() if kind == "transformer"]
  resnet = [v for (kind, _), v in medians.items() if kind == "resnet"]
  if not transformers or not resnet:
    status, evidence = "inconclusive", "JS⁰ measured for " + ", ".join(
        f"{t} ({k})" for k, t in medians) + "; a ResNet and a transformer are both needed"
  else:
    every = all(v > max(resnet) for v in transformers)
    status = ("reproduced" if every else "partly reproduced"
              if np.median(transformers) > max(resnet) else "not reproduced")
    evidence = ("JS⁰ " + ", ".join(f"{t} {v:.3g}" for (k, t), v in medians.items()
                                   if k == "transformer")
                + f" against the ResNet's {max(resnet):.3g}")
  value = ", ".join(f"{t} {v:.3g}" for (_, t), v in medians.items())
  return ("### Block heterogeneity of the Hessian (beyond the paper)\n\n"
          "Each block's diagonal Hessian block by stochastic Lanczos quadrature (preset "
          "`block_spectrum_steps` steps × `block_spectrum_samples` start vectors, on the probe "
          "batch), smoothed by a Gaussian of 1% of all nodes' range; JS⁰ is the mean "
          "Jensen-Shannon distance over block pairs (natural log, in [0, 0.83]). Figures: "
          "`figures/block_spectra_<task>.png` (seed 0's densities).\n\n" + table), [
              verdict(CLAIM, status, RULE, evidence, value=value,
                      paper="Zhang et al.: JS⁰ of BERT, GPT and ViT far above ResNet's")]


def _plot(out, kind, task, record):
  split = record["block_spectra"]
  nodes = np.concatenate([np.ravel(n) for n in split["nodes"]])
  span = max(float(nodes.max() - nodes.min()), 1e-12)
  grid = np.linspace(nodes.min() - 0.05 * span, nodes.max() + 0.05 * span, 400)
  fig, ax = new_figure(figsize=(6.5, 4))
  for name, n, w in zip(split["blocks"], split["nodes"], split["weights"]):
    ax.semilogy(grid, np.maximum(spectrum.density_curve(n, w, grid, 0.01 * span), 1e-12),
                label=name)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  ax.set_title(f"{task} ({kind}): Hessian block spectra, epoch {record['epoch']}")
  ax.legend(fontsize=7)
  save_figure(fig, figure_path(out, f"block_spectra_{task}"))


EXPERIMENT = Experiment(NAME, "beyond the paper: Hessian block spectra and their "
                        "Jensen-Shannon heterogeneity", trajectory.run_transformer_units, write,
                        probing.is_trajectory, ("tables/block_spectra",
                                                "figures/block_spectra_<task>"),
                        trajectory.TRANSFORMER_TASKS, in_reproduce=False,
                        needs=("block_spectra", "sharpness"))
