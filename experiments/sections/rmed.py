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
RULE = ("per task, over every (seed, probe point, layer with 2+ dimensions) sampled on both "
        "trajectories, paired (the same seed, epoch and coordinates): d = log10 R_med on "
        "Adam's trajectory − on SGD's; a 90% bootstrap interval of the median d, resampling "
        "(seed, probe point) clusters; reproduced if it lies below 0, not reproduced if above "
        "0, inconclusive otherwise")
LEVEL = 0.9


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


def paired_layer_differences(sampled, task) -> dict:
  """{(seed, epoch): log10 R_med(Adam's trajectory) − log10 R_med(SGD's), per 2-D layer}
  where both trajectories have that seed and epoch sampled (the same coordinates: the
  sample depends on the seed only)."""
  layers = {}
  for r in sampled:
    if r["kind"] == "transformer" and r["task"] == task:
      layers[(r["trajectory"], r["seed"], r["epoch"])] = sample_r_med(r["curvature_sample"])[1]
  out = {}
  for (trajectory, seed, epoch), adam in layers.items():
    sgd = layers.get(("sgd", seed, epoch))
    if trajectory != "adam" or sgd is None:
      continue
    with np.errstate(divide="ignore", invalid="ignore"):
      d = [np.log10(adam[name]) - np.log10(sgd[name]) for name in adam if name in sgd]
    d = np.asarray([v for v in d if np.isfinite(v)])
    if d.size:
      out[(seed, epoch)] = d
  return out


def cluster_bootstrap(clusters, statistic, level, rng, resamples: int = 2000) -> tuple:
  """(low, high) of ``statistic`` over resamples of whole clusters (with replacement)."""
  estimates = []
  for _ in range(resamples):
    chosen = rng.integers(0, len(clusters), len(clusters))
    estimates.append(statistic(np.concatenate([clusters[i] for i in chosen])))
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(estimates, [tail, 100 - tail])
  return float(low), float(high)


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
  verdicts, paired_rows = [], []
  for task in sorted({r["task"] for r in sampled if r["kind"] == "transformer"}):
    clusters = paired_layer_differences(sampled, task)
    if not clusters:
      continue
    d = np.concatenate(list(clusters.values()))
    median = float(np.median(d))
    low, high = cluster_bootstrap(list(clusters.values()), np.median, LEVEL, rng)
    status = "reproduced" if high < 0 else "not reproduced" if low > 0 else "inconclusive"
    paired_rows.append([task, len(clusters), d.size, median, low, high,
                        float(np.mean(d < 0))])
    evidence = (f"median d = {median:.3g} [{low:.3g}, {high:.3g}] over {d.size} (seed, point, "
                f"layer) pairs in {len(clusters)} (seed, point) clusters; Adam's R_med is the "
                f"smaller in {np.mean(d < 0):.0%} of them")
    verdicts.append(verdict("rmed", status, RULE, evidence, task,
                            value=f"median Δlog10 R_med (Adam − SGD) {median:.2g} "
                                  f"[{low:.2g}, {high:.2g}]",
                            paper="Adam's smaller (seed 002)"))
  paired = write_table(out, "rmed_paired", ["task", "(seed, point) clusters", "layer pairs",
                                            "median d = Δlog10 R_med (Adam − SGD)",
                                            "90% low", "90% high", "share with Adam smaller"],
                       paired_rows)
  return ("### R_med along the trajectories (seed 002)\n\nExact Hessian diagonal entries at a "
          "fixed random sample of coordinates per leaf (preset `curvature_samples`) on the "
          "probe batch. The value over all parameters weights each sampled entry by its "
          "leaf's size; per-layer values (leaves with 2+ dimensions) are in "
          "`tables/rmed_per_layer.md`. A sample's max underestimates the population's, so "
          "R_med here is that of the sample design, identical for both trajectories, which "
          "the verdict pairs layer by layer (`tables/rmed_paired.md`).\n\n" + table + "\n\n"
          + paired), verdicts


EXPERIMENT = on_probe_units(NAME, "seed 002's R_med along SGD and Adam trajectories", write,
                            ("tables/rmed", "tables/rmed_per_layer"), ("hessian_diagonal",),
                            reads=probing.is_probe)
