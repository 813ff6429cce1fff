"""metrics.jsonl: one JSON object per measurement, each with an ``experiment`` and a unique
``key``; the one source the report is rebuilt from.

JSON has no literal for NaN or infinity, so `experiments.artifacts.run_folder.jsonable`
writes them as the strings ``"nan"``, ``"inf"`` and ``"-inf"``; `read_metrics` turns them
back into floats, so every record reads back as written. The fields of every record are
documented in `experiments.artifacts.records`.
"""

from __future__ import annotations

import json
import os

from experiments.artifacts.run_folder import jsonable


class Metrics:
  """Append-only metrics.jsonl; a record whose key is already there is not written twice
  (so a resumed run does not duplicate what it measured before it was killed)."""

  def __init__(self, out: str, live=None):
    self.path = os.path.join(out, "metrics.jsonl")
    self.live = live  # an `experiments.artifacts.live.TensorBoard`, or None
    set_aside_cut_line(self.path)
    self.records = read_metrics(out)
    self.keys = {r["key"] for r in self.records}

  def has(self, key: str) -> bool:
    return key in self.keys

  def get(self, key: str) -> dict:
    return next(r for r in self.records if r["key"] == key)

  def log(self, experiment: str, key: str, **fields) -> dict:
    record = jsonable({"experiment": experiment, "key": key, **fields})
    if key in self.keys:
      return as_written(record)
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
    record = as_written(record)
    self.records.append(record)
    self.keys.add(key)
    if self.live is not None:
      self.live.record(record)
    return record


CUT = ".cut"  # metrics.jsonl.cut: the fragments of lines cut short, kept for inspection


def set_aside_cut_line(path: str) -> None:
  """A file that does not end in a newline ends in a line cut short (a kill or a full disk
  mid-write): the fragment moves to ``metrics.jsonl.cut`` and the file ends at its last
  whole line, so that the next record starts a line of its own instead of being glued to
  the fragment (and lost with it). Its measurement is redone on resume."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if not data or data.endswith(b"\n"):
      return
    keep = data.rfind(b"\n") + 1
    with open(path + CUT, "ab") as side:
      side.write(data[keep:] + b"\n")
      side.flush()
      os.fsync(side.fileno())
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())


NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def as_written(value):
  """A decoded record with the non-finite floats that `jsonable` wrote as strings restored."""
  if isinstance(value, dict):
    return {k: as_written(v) for k, v in value.items()}
  if isinstance(value, list):
    return [as_written(v) for v in value]
  if isinstance(value, str) and value in NON_FINITE:
    return NON_FINITE[value]
  return value


def read_metrics(out: str) -> list:
  path = os.path.join(out, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(as_written(json.loads(line)))
        except json.JSONDecodeError:
          continue  # a line cut short by a kill; its measurement is redone on resume
  return records
