"""Tables as CSV and Markdown, and the number formatting the report uses."""

from __future__ import annotations

import csv
import math
from typing import Iterable, Sequence

import numpy as np

from experiments.artifacts.run_folder import table_path


def write_table(out: str, name: str, header: Sequence[str], rows: Iterable[Sequence]) -> str:
  """tables/<name>.csv and tables/<name>.md; returns the Markdown."""
  rows = [list(r) for r in rows]
  with open(table_path(out, name, "csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  markdown = markdown_table(header, rows)
  with open(table_path(out, name, "md"), "w") as f:
    f.write(markdown + "\n")
  return markdown


def markdown_table(header, rows) -> str:
  """A Markdown table; pipes inside cells (|g|, say) are escaped."""
  cell = lambda v: str(v).replace("|", "\\|")
  fmt = lambda v: format_number(v) if isinstance(v, (float, np.floating)) else cell(v)
  lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def format_number(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  value = float(value)
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"


def bootstrap_interval(values, statistic=np.mean, level: float = 0.9, *,
                       resamples: int = 2000, seed: int = 0) -> tuple:
  """(low, high) of the central ``level`` interval of ``statistic`` over bootstrap resamples
  of ``values`` (NaN for no values; a fixed seed, so a report rebuilds identically)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  draws = values[rng.integers(0, values.size, (resamples, values.size))]
  estimates = np.apply_along_axis(statistic, 1, draws)
  tail = (1 - level) / 2 * 100
  with np.errstate(invalid="ignore"):
    low, high = np.nanpercentile(estimates, [tail, 100 - tail])
  return float(low), float(high)


def mean_std(values) -> tuple:
  values = np.asarray([v for v in values if v is not None], np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  return float(values.mean()), float(values.std())
