"""report.md from a run folder's metrics alone: every table and figure, the paper's values
beside ours, and one verdict line per claim."""

from __future__ import annotations

import os

from experiments import registry
from experiments.metrics import read_metrics
from experiments.run_folder import UsageError, read_config


def build(out: str) -> str:
  if not os.path.isdir(out):
    raise UsageError(f"{out!r} is not a run folder")
  for sub in ("tables", "figures"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  records = read_metrics(out)
  config = read_config(out)
  sections, verdicts = [], []
  for experiment in registry.EXPERIMENTS:
    written = experiment.report(out, [r for r in records if experiment.reads(r)])
    if written is not None:
      text, lines = written
      sections.append(text)
      verdicts += lines
  header = [f"# optclip reproduction report",
            "",
            f"Pan & Li (2023), *Toward Understanding Why Adam Converges Faster Than SGD for "
            f"Transformers* (arXiv 2306.00204), reproduced with optclip.",
            "",
            f"- preset: `{config.get('preset', '?')}`, seeds: {config.get('seeds', '?')}",
            f"- device: {config.get('environment', {}).get('device', '?')}",
            f"- wall time: {config.get('wall_time_s', '?')} s",
            f"- data: " + "; ".join(f"{k}: {v.get('source')} ({v.get('size')} items, "
                                    f"sha256 {v.get('sha256')})"
                                    for k, v in sorted(config.get("data", {}).items())),
            ""]
  if config.get("preset") != "paper":
    header += ["Scaled-down models and offline data: the numbers test the paper's *qualitative* "
               "claims; paper values are listed beside ours for orientation, not as targets.", ""]
  body = "\n".join(header) + "\n## Verdicts\n\n" + "\n".join(f"- {v}" for v in verdicts) + \
      "\n\n## Tables and figures\n\n" + "\n\n".join(sections) + "\n"
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(body)
  return body


def verdict_lines(out: str) -> list:
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  section = text.split("## Verdicts", 1)[1].split("## Tables", 1)[0]
  return [line[2:] for line in section.splitlines() if line.startswith("- ")]
