"""Seed 002's statistic R_med = max |H_ii| / median |H_ii| along the SGD and Adam
trajectories, per layer (every leaf with at least 2 dimensions) and over all parameters,
from exact Hessian diagonal entries (second derivatives along eᵢ) at a fixed random sample
of coordinates per leaf on the probe batch. Sampling error is shown by a bootstrap over the
sampled coordinates; a verdict is drawn only where the spread over seeds and samples leaves
it unambiguous."""

from __future__ import annotations

import numpy as np

from experiments import probing
from experiments.artifacts.tables import write_table
from experiments.paper.claims import verdict
from experiments.setup.experiment import on_probe_units

NAME = "rmed"
BOOTSTRAP = 200
RULE = ("per seed, log10 R_med over all parameters at the last probe point with a sample, "
        "with a 5-95% bootstrap interval over the sampled coordinates; reproduced if every "
        "Adam seed's upper end lies below every SGD seed's lower end, not reproduced if every "
        "Adam lower end lies above every SGD upper end, otherwise no verdict (ambiguous)")


def upper_median(values, weights=None):
  """The ⌈W/2⌉-th largest value by weight (the ⌈n/2⌉-th largest for unit weights, as
  `optclip.curvature.r_med`)."""
  values = np.asarray(values, np.float64)
  weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
  order = np.argsort(-values, kind="stable")
  cumulative = np.cumsum(weights[order])
  return values[order][np.searchsorted(cumulative, np.ceil(cumulative[-1] / 2 - 1e-9))]


def r_med(values, weights=None) -> float:
  """max |H_ii| / median |H_ii| of a sample (weights: coordinates each value stands for)."""
  magnitude = np.abs(np.asarray(values, np.float64))
  with np.errstate(divide="ignore", invalid="ignore"):  # a zero median: R_med = inf
    return float(magnitude.max() / upper_median(magnitude, weights))


def sample_r_med(curvature_sample) -> tuple:
  """(R_med over all parameters, {layer: R_med}) from a probe record's sample; the overall
  value weights each sampled entry by the coordinates of its leaf it stands for."""
  diagonal = curvature_sample["hessian_diagonal"]
  shapes = curvature_sample["leaf_shapes"]
  values, weights, layers = [], [], {}
  for name, entries in diagonal.items():
    if not entries:
      continue
    size = int(np.prod(shapes[name])) if shapes[name] else 1
    values += entries
    weights += [size / len(entries)] * len(entries)
    if len(shapes[name]) >= 2:
      layers[name] = r_med(entries)
  return (r_med(values, weights) if values else float("nan")), layers


def _bootstrap(curvature_sample, rng) -> np.ndarray:
  """log10 R_med over all parameters for coordinates resampled within every leaf."""
  out = []
  for _ in range(BOOTSTRAP):
    resampled = {name: list(rng.choice(entries, len(entries))) if entries else []
                 for name, entries in curvature_sample["hessian_diagonal"].items()}
    out.append(np.log10(sample_r_med({**curvature_sample, "hessian_diagonal": resampled})[0]))
  return np.asarray(out)


def write(out: str, records):
  sampled = probing.with_samples(records)
  if not sampled:
    return None
  rng = np.random.default_rng(2002)
  rows, layer_rows, per_seed = [], [], {}
  for r in sorted(sampled, key=lambda r: (r["kind"], r["task"], r["trajectory"], r["seed"],
                                          r["epoch"])):
    overall, layers = sample_r_med(r["curvature_sample"])
    boot = _bootstrap(r["curvature_sample"], rng)
    with np.errstate(invalid="ignore"):  # resamples with a zero median (inf): nan, no verdict
      low, high = np.percentile(boot, [5, 95])
    count = sum(len(v) for v in r["curvature_sample"]["hessian_diagonal"].values())
    rows.append([r["task"], r["trajectory"], r["seed"], r["epoch"], count, overall,
                 10 ** low, 10 ** high, float(np.median(list(layers.values()))) if layers
                 else float("nan")])
    per_seed[(r["task"], r["trajectory"], r["seed"])] = (np.log10(overall), low, high)
    for name, value in layers.items():
      layer_rows.append([r["task"], r["trajectory"], r["seed"], r["epoch"], name,
                         len(r["curvature_sample"]["hessian_diagonal"][name]), value])
  table = write_table(out, "rmed", ["task", "trajectory", "seed", "epoch", "sampled H_ii",
                                    "R_med (all parameters)", "bootstrap 5%", "bootstrap 95%",
                                    "median of per-layer R_med"], rows)
  write_table(out, "rmed_per_layer", ["task", "trajectory", "seed", "epoch", "layer",
                                      "sampled", "R_med"], layer_rows)
  verdicts = []
  for task in sorted({key[0] for key in per_seed}):
    adam = [v for (t, traj, _), v in per_seed.items() if t == task and traj == "adam"]
    sgd = [v for (t, traj, _), v in per_seed.items() if t == task and traj == "sgd"]
    if not adam or not sgd:
      continue
    if max(a[2] for a in adam) < min(s[1] for s in sgd):
      status = "reproduced"
    elif min(a[1] for a in adam) > max(s[2] for s in sgd):
      status = "not reproduced"
    else:
      status = "no verdict (the spread over seeds and samples overlaps)"
    evidence = ("log10 R_med Adam " + ", ".join(f"{a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}]"
                                              for a in adam)
                + "; SGD " + ", ".join(f"{s[0]:.2f} [{s[1]:.2f}, {s[2]:.2f}]" for s in sgd))
    verdicts.append(verdict("rmed", status, RULE, evidence, task))
  return ("### R_med along the trajectories (seed 002)\n\nExact Hessian diagonal entries at a "
          "fixed random sample of coordinates per leaf (preset `curvature_samples`) on the "
          "probe batch. The value over all parameters weights each sampled entry by its "
          "leaf's size; per-layer values (leaves with 2+ dimensions) are in "
          "`tables/rmed_per_layer.md`. A sample's max underestimates the population's, so "
          "R_med here is that of the sample design, identical for both trajectories.\n\n"
          + table), verdicts


EXPERIMENT = on_probe_units(NAME, "seed 002's R_med along SGD and Adam trajectories", write,
                            ("tables/rmed", "tables/rmed_per_layer"), ("hessian_diagonal",),
                            reads=probing.is_probe)
