"""report.md from a run folder's metrics alone: every table and figure, the paper's values
beside ours, and one verdict line per claim."""

from __future__ import annotations

import os
import types

from experiments import registry
from experiments.artifacts.metrics import read_metrics
from experiments.artifacts.run_folder import read_config
from experiments.artifacts.tables import markdown_table
from experiments.errors import UsageError
from experiments.paper.choices import choices
from experiments.paper.claims import NotRun


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
        verdicts.append(NotRun(experiment.name, reason))
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
  body = ("\n".join(header) + "\n## At a glance\n\n" + glance(verdicts)
          + "\n\n## Verdicts\n\n" + "\n".join(f"- {v}" for v in verdicts)
          + "\n\n## Choices\n\n" + "\n".join(f"- {c}" for c in choices(config))
          + "\n\n## Tables and figures\n\n" + "\n\n".join(sections) + "\n")
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(body)
  return body


def glance(verdicts) -> str:
  """One row per verdict: the claim, where the paper makes it, the verdict, our value (with
  its interval) and the paper's."""
  rows = []
  for v in verdicts:
    if isinstance(v, NotRun):
      rows.append([v.experiment, "–", f"not run (switched off by {v.reason})", "–", "–"])
      continue
    claim = v.claim.summary + (f" ({v.scope})" if v.scope else "")
    rows.append([claim, v.section, v.status, v.value or "–", v.paper or "–"])
  return markdown_table(["claim", "section", "verdict", "ours", "paper"], rows)


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
