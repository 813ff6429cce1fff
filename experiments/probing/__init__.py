"""The probe trajectories: the probe optimizers (`probes`), the measurements of a probe point
(`measurements`), one trajectory unit (`trajectory`) and, here, how the report sections read
the probe records back."""

from __future__ import annotations

import collections

import numpy as np

from experiments.probing.probes import PAPER_PROBES, PROBES
from experiments.probing.trajectory import EXPERIMENT, TRANSFORMER_TASKS
from experiments.training.variants import by_label

KNOWN = by_label(v for probes in PROBES.values() for v in probes)
PAPER_LABELS = {kind: [v.label for v in probes] for kind, probes in PAPER_PROBES.items()}


def is_probe(record, kind=None) -> bool:
  return (record["experiment"] == EXPERIMENT and record["key"].endswith("/probe")
          and (kind is None or record["kind"] == kind))


def is_trajectory(record) -> bool:
  return record["experiment"] == EXPERIMENT


def probe_records(records, *, kind="transformer"):
  return [r for r in records if is_probe(r, kind)]


def grouped(records, kind="transformer"):
  """{(task, trajectory): {epoch: [probe record per seed, in seed order]}}."""
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in sorted(probe_records(records, kind=kind), key=lambda r: r["seed"]):
    out[(r["task"], r["trajectory"])][r["epoch"]].append(r)
  return out


def values(record, field="sharpness") -> dict:
  """{label: the record's ``field`` for that direction}, as float64."""
  return dict(zip(record["algorithms"], np.asarray(record[field], np.float64)))


def sgd_reference(record) -> tuple:
  """SGD's sharpness as the ratios' denominator, and whether it is Eq. 4's shifted value.

  As in the paper (Appendix B.3): SGD's raw value, unless it is negative; then its value at
  x + δu/‖u‖ (Eq. 4), marked wherever it is used.
  """
  raw = values(record)["sgd"]
  return (raw, False) if raw > 0 else (values(record, "sharpness_robust")["sgd"], True)


def ratios(record) -> dict:
  """{label: raw sharpness / SGD's (see `sgd_reference`)}; SGD's own is 1 by definition,
  also where its shifted value is the reference (the paper's SGD rows are all 1)."""
  reference, _ = sgd_reference(record)
  out = {name: value / reference for name, value in values(record).items()}
  out["sgd"] = 1.0
  return out


def unclipped_pairs(labels):
  """(unclipped, clipped-gradient) label pairs among the paper's variants in ``labels``."""
  paper = {label for labels_ in PAPER_LABELS.values() for label in labels_}
  pairs = []
  for label in labels:
    variant = KNOWN[label]
    if label in paper and variant.clip is not None and variant.unclipped.label in labels:
      pairs.append((variant.unclipped.label, label))
  return pairs


def best_reduction(record, index) -> tuple:
  """The best one-step loss reduction along direction ``index`` and the step that gives it
  (NaN where the landscape was not measured)."""
  if "landscape" not in record:
    return float("nan"), float("nan")
  curve = np.asarray(record["landscape"][index], np.float64)
  if not np.isfinite(curve[0]):  # a zero direction (see the clip ablation): undefined
    return float("nan"), float("nan")
  curve = np.where(np.isfinite(curve), curve, np.inf)
  return curve[0] - curve.min(), record["step_sizes"][int(np.argmin(curve))]


def with_samples(records, kind=None):
  """The probe records (of ``kind``) that carry exact Hessian diagonal entries."""
  return [r for r in records if is_probe(r, kind) and any(
      r.get("curvature_sample", {}).get("hessian_diagonal", {}).values())]
