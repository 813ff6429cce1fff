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


def mean_std(values) -> tuple:
  values = np.asarray([v for v in values if v is not None], np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  return float(values.mean()), float(values.std())
