"""report.md from a run folder's metrics alone: every table and figure, the paper's values
beside ours, and one verdict line per claim."""

from __future__ import annotations

import os
import types

from experiments import registry
from experiments.artifacts.metrics import read_metrics
from experiments.artifacts.run_folder import read_config
from experiments.errors import UsageError


def choices(config: dict) -> list:
  """The protocol's choices where the paper is silent or its boxes and code differ, one
  line each, with the section they bear on."""
  values = config.get("preset_values", {})
  tasks = {name: values.get(name, {}) for name in ("translation", "code")}
  pretraining = "; ".join(
      f"{name}: {t.get('pretrain_size')} examples × {t.get('pretrain_epochs')} epochs of Adam "
      f"{t.get('pretrain_learning_rate')}" for name, t in tasks.items() if t.get("pretrain_size"))
  rates = values.get("trajectory_learning_rates", {})
  return [
      f"**Probe batch** (Appendix B.3 \"Test Batch\", Section 5): "
      f"{'a fixed random subset of the training subset, as the paper code samples it from the training loader' if values.get('probe_batch', 'train') == 'train' else 'HELD-OUT examples outside the training subset (not the paper protocol: the probes then describe held-out loss)'}"
      "; its indices' hash is in config.json.",
      "**Directional sharpness is reported raw**, negative values included (Tables 1, 4-7); "
      "Eq. 4's δ-shifted value (δ = 0.01, Appendix B.3) is stored beside every negative one "
      "and used only as SGD's denominator when SGD's raw value is negative, marked ‡.",
      "**SGD momentum start** (Algorithm 3 vs the paper's code): the SGD-family probes (SGD, "
      "normalized SGD, sign SGD) start at m₁ = g₁ as the paper's code does; the SGD "
      "trajectory follows the SGD probe. `optclip.sgd`'s default is the box (m₀ = 0).",
      "**Adam's bias correction** (Algorithm 6's box omits it): standard Adam, as `optax.adam`.",
      "**Lion's clip update** (Section 4.1, unspecified): the sign is replaced by clip(c)/τ_c, "
      "so coordinates at or above τ_c are ±1 and the rest keep their relative size.",
      "**Lion's weight decay** (Algorithm 9 has none): 0, passed explicitly.",
      "**Adafactor without momentum** (Algorithms 7-8 have none although Section 5 says all "
      "algorithms use momentum): the boxes, with relative step sizes for the probes.",
      "**Adafactor on convolution kernels** (Appendix E, unspecified): HWIO kernels are "
      "factored over their last two axes (I, O), the spatial axes batched.",
      "**GPT-Neo input masking** (Appendix B.1): 15% of the input tokens are replaced by the "
      "mask token once, at the start; the loss is the causal LM loss on every next token.",
      "**Pretrained starts** (Table 2 fine-tunes pretrained models): "
      + (f"the mini models are first trained on the other half of their offline corpus "
         f"({pretraining}); classification (BERT) and the ResNet start from random weights."
         if pretraining else "checkpoint folders given with --checkpoint, or random weights."),
      f"**Trajectory learning rates**: SGD {rates.get('sgd')}, Adam {rates.get('adam')}"
      + {"quick": " — the smallest of the grids {0.03, 0.1, 0.3} (SGD) and {2e-4, 1e-3} "
                  "(Adam) at which the probe-batch loss falls by at least 5% over the run (the "
                  "paper: 2e-4 for both, Appendix B.3)",
         "smoke": " (the smoke preset only tests the machinery)"}.get(config.get("preset"), "")
      + ".",
      f"**R_med and Section 4.2's correlation** (seed 002; the paper is silent on how): exact "
      f"H_ii at a fixed random sample of {values.get('curvature_samples')} coordinates per "
      f"leaf, at {'every probe point' if values.get('curvature_at') == 'every' else 'the last probe point of every trajectory'}.",
      f"**λ_max** (Section 3.1): Lanczos with {values.get('lanczos_iterations')} iterations "
      "(it can only underestimate the supremum).",
      "**Clipping**: one threshold over all parameters, k = ⌈fraction·n⌉, ties at τ unchanged; "
      "at 100% every coordinate is clipped to the smallest |g|.",
  ]


def build(out: str) -> str:
  if not os.path.isdir(out):
    raise UsageError(f"{out!r} is not a run folder")
  for sub in ("tables", "figures"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  records = read_metrics(out)
  config = read_config(out)
  preset = types.SimpleNamespace(**config.get("preset_values", {}))
  sections, verdicts = [], []
  for experiment in registry.EXPERIMENTS:
    read = [r for r in records if experiment.reads(r)]
    reason = _switched_off(experiment, preset)
    if reason is not None:
      if read or config.get("command") in (experiment.name, "reproduce"):
        sections.append(f"### {experiment.name}: not run\n\n{experiment.help[0].upper()}"
                        f"{experiment.help[1:]}: not run, switched off by {reason}.")
        verdicts.append(f"{experiment.name}: **not run** (switched off by {reason})")
      continue
    written = experiment.report(out, read)
    if written is not None:
      text, lines = written
      sections.append(text)
      verdicts += lines
  header = ["# optclip reproduction report",
            "",
            "Pan & Li (2023), *Toward Understanding Why Adam Converges Faster Than SGD for "
            "Transformers* (arXiv 2306.00204), reproduced with optclip.",
            "",
            f"- preset: `{config.get('preset', '?')}`, seeds: {config.get('seeds', '?')}",
            f"- device: {config.get('environment', {}).get('device', '?')}",
            f"- wall time: {config.get('wall_time_s', '?')} s",
            "- data: " + "; ".join(f"{k}: {v.get('source')} ({v.get('size')} items, "
                                    f"sha256 {v.get('sha256')})"
                                    for k, v in sorted(config.get("data", {}).items())),
            ""]
  if config.get("preset") != "paper":
    header += ["Scaled-down models and offline data: the numbers test the paper's *qualitative* "
               "claims; paper values are listed beside ours for orientation, not as targets.", ""]
  body = ("\n".join(header) + "\n## Verdicts\n\n" + "\n".join(f"- {v}" for v in verdicts)
          + "\n\n## Choices\n\n" + "\n".join(f"- {c}" for c in choices(config))
          + "\n\n## Tables and figures\n\n" + "\n\n".join(sections) + "\n")
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(body)
  return body


def _switched_off(experiment, preset) -> str | None:
  """Why the run's preset switched ``experiment`` off (None: on, or a config from before the
  preset had the setting)."""
  try:
    return experiment.switched_off(preset)
  except AttributeError:
    return None


def verdict_lines(out: str) -> list:
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  section = text.split("## Verdicts", 1)[1].split("## Choices", 1)[0]
  return [line[2:] for line in section.splitlines() if line.startswith("- ")]
