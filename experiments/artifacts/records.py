"""Every field of every metrics.jsonl record, documented in this one place.

A record is ``{"experiment": ..., "key": ..., **fields}``; its ``key`` says which kind it is
(the last part of the key, or the experiment where it has one kind). `FIELDS` maps
(experiment, kind) to {field: what it holds}; a probe point's fields are declared by the
measurements that write them and gathered by `probe_fields`. `kind_of` finds a record's
kind, and a test checks that every record a smoke run writes is documented here. Values
that are NaN or infinite are written as the strings "nan", "inf" and "-inf" and read back as
floats (`experiments.artifacts.metrics.read_metrics`).
"""

from __future__ import annotations

_UNIT = {
    "kind": "which probe set the trajectory carries: transformer, resnet or scaling",
    "task": "translation, code, classification or images",
    "trajectory": "the probe optimizer training follows: sgd or adam",
    "seed": "the run's seed (training subset, probe batch, batch order, initialisation)",
    "model": "the model preset (the scale trend only)",
}


def probe_fields() -> dict:
  """A probe record's fields: the trajectory's own, and those every measurement of
  `experiments.probing.measurements` declares beside its code."""
  from experiments.probing import measurements
  fields = {
      "epoch": "the probe epoch (epochs trained so far)",
      "algorithms": "the K probe directions' labels, in the order of every per-direction list",
      "step_sizes": "the landscape's step sizes (distances along u/‖u‖)",
      "histogram_range": "(low, high) of log10 |coordinate| of the histograms"}
  for measurement in measurements.MEASUREMENTS:
    fields.update(measurement.fields)
  return fields


FIELDS = {
    ("quadratic", "quadratic"): {
        "seed": _UNIT["seed"], "algorithm": "sgd, sgd clipped or adam",
        "learning_rate": "the best rate of the grid (final loss after 100 steps)",
        "losses": "f(x_t) for t = 0..100"},
    ("trajectory", "start"): {
        **_UNIT, "epoch": "0", "probe_loss": "the probe-batch loss at the start",
        "learning_rate": "the trajectory's rate", "parameters": "the model's parameter count"},
    ("trajectory", "train"): {
        **_UNIT, "epoch": "epochs trained", "train_loss": "the epoch's mean training loss"},
    ("trajectory", "done"): dict(_UNIT),
    ("convergence", "stage"): {
        "task": _UNIT["task"], "algorithm": "the variant's label",
        "stage": "coarse, coarse-up, coarse-down, fine0, fine1, fine2 (the tuning scans) or "
                 "evaluation",
        "tuning_seeds": "the seeds the rates are tuned on",
        "steps_per_epoch": "optimizer steps per epoch",
        "runs": "[{learning_rate, seed, epoch_losses: the epoch's mean training loss per "
                "epoch, start_loss and final_loss: on the whole training subset}]",
        "own_rate": "evaluation: the member's tuned rate",
        "partner_rate": "evaluation: the pair partner's tuned rate (for the unclipped "
                        "member, the control)"},
    ("smoothness", "epoch"): {
        "seed": _UNIT["seed"], "epoch": "epochs trained before the measurement",
        "measured": "{'attention 2x', 'attention 4x', 'all 2x', 'all 4x': {L: ‖G‖₂/|S| of "
                    "the Gauss-Newton matrix over the attention weights or all parameters, "
                    "l: the same after removing the coordinates with row norm >= 2× or 4× "
                    "the mean, ratio: L/ℓ, epsilon: the fraction removed, removed_per_leaf: "
                    "{leaf: coordinates removed}}}"},
    ("smoothness", "done"): {"seed": _UNIT["seed"]},
    ("pilot", "pilot"): {
        **_UNIT, "rates": "the grid tried", "start_loss": "per rate: the probe-batch loss "
        "at the start", "final_loss": "per rate: after the trajectory's epochs",
        "chosen": "the smallest rate whose loss fell by at least `drop` (else the largest)",
        "criterion_met": "whether one did", "drop": "the criterion's fraction",
        "epochs": "the trajectory's epochs"},
    ("theory", "theory"): {
        "seed": _UNIT["seed"], "epsilon": "the fraction of bad coordinates",
        "delta": "the clipped fraction", "L": "‖H‖₂", "l": "‖H‖₂ without the bad coordinates",
        "C1": "‖ĝ‖/‖∇f‖", "C2": "√d·c/‖ĝ‖", "sgd_sharpness": "∇fᵀH∇f/‖∇f‖²",
        "clipped_sharpness": "ĝᵀHĝ/‖ĝ‖²", "bound": "C₂(2√εL + ℓ)",
        "bound_without_factor_2": "C₂(√εL + ℓ)", "step": "the theorem's η",
        "decrement": "f(x₀) − f(x₀ − ηĝ)", "guaranteed": "the theorem's decrement",
        "sgd_decrement": "‖∇f‖²/(2L)", "bound_holds": "|ĝᵀHĝ|/‖ĝ‖² ≤ bound",
        "decrement_holds": "decrement ≥ guaranteed"},
}


def kind_of(record) -> tuple:
  """(experiment, kind) of a record, the key into `FIELDS`."""
  experiment, key = record["experiment"], record["key"]
  last = key.rsplit("/", 1)[-1]
  if experiment == "trajectory":
    return experiment, last
  if experiment == "convergence":
    return experiment, "stage"
  if experiment == "smoothness":
    return experiment, "done" if last == "done" else "epoch"
  return experiment, experiment


def undocumented(record) -> list:
  """The fields of ``record`` that `FIELDS` (or `probe_fields`) does not document."""
  kind = kind_of(record)
  documented = {**_UNIT, **probe_fields()} if kind == ("trajectory", "probe") else (
      FIELDS.get(kind, {}))
  return sorted(set(record) - {"experiment", "key"} - set(documented))
