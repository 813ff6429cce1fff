"""`Experiment`: what a section declares about itself — its command, how it runs, what it
reports and reads, what it writes, what it needs measured — so that a section is one module.
`experiments.registry` lists the sections in report order."""

from __future__ import annotations

import dataclasses
from typing import Callable

from experiments import probing
from experiments.probing import measurements, trajectory


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  help: str  # the command's help (argparse: a literal % is written %%)
  run: Callable  # (Context) -> None; measures and logs to metrics.jsonl, resumable
  report: Callable  # (out, records) -> (markdown, verdict lines), or None with nothing to say
  reads: Callable  # record -> bool: the metrics records its report reads
  writes: tuple  # tables/ and figures/ it writes (names; <task>, <trajectory>, <epoch> vary)
  tasks: tuple = ()  # the tasks its run builds (preflight builds them first)
  # False where running another experiment already measures everything it reports.
  in_reproduce: bool = True
  # The probe measurements its report needs (experiments.probing.measurements), and why a
  # preset switches the experiment itself off (None: it runs).
  needs: tuple = ()
  off: Callable = lambda preset: None

  def switched_off(self, preset) -> str | None:
    """Why ``preset`` leaves this experiment with nothing to report, or None."""
    reasons = [self.off(preset)] + [measurements.off_reason(measurements.BY_NAME[m], preset)
                                     for m in self.needs]
    reasons = [r for r in reasons if r is not None]
    return "; ".join(dict.fromkeys(reasons)) if reasons else None


def records_of(experiment: str) -> Callable:
  return lambda record: record["experiment"] == experiment


def transformer_probes(record) -> bool:
  return probing.is_probe(record, "transformer")


def on_probe_units(name, help_text, report, writes, needs, reads=transformer_probes
                   ) -> Experiment:
  """An experiment that reports on the transformer trajectory units (which `sharpness`
  runs), so `reproduce` need not run it again."""
  return Experiment(name, help_text, trajectory.run_transformer_units, report, reads, writes,
                    trajectory.TRANSFORMER_TASKS, in_reproduce=False, needs=needs)
