"""``--tensorboard DIR``: a live view of a long run, beside metrics.jsonl (which stays the one
source the report is built from).

Every record `experiments.artifacts.metrics.Metrics` writes is mirrored as TensorBoard
scalars under its key: numbers as scalars at the record's ``epoch`` (0 where it has none),
lists of numbers (curves: a run's epoch losses, a landscape) as one series indexed by
position, nested dicts and lists of records by path. Training losses come per step from
`experiments.training.loop.run_epochs`, written at each epoch's end so that training never
waits on the writer. The writer is tensorboardX (the ``tensorboard`` extra).
"""

from __future__ import annotations

import math
import numbers

from experiments.errors import UsageError

MAX_SERIES = 4096  # longer lists (histogram counts, samples) are left to metrics.jsonl


class TensorBoard:
  """Event files under ``folder``, one run per experiment folder."""

  def __init__(self, folder: str):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as error:
      raise UsageError("--tensorboard needs tensorboardX: pip install -e \".[tensorboard]\"") \
          from error
    self.writer = SummaryWriter(folder, flush_secs=30)

  def record(self, record: dict) -> None:
    """Mirror one metrics record (see the module docstring)."""
    step = record.get("epoch", 0)
    step = int(step) if isinstance(step, numbers.Number) and math.isfinite(step) else 0
    for tag, value, at in _scalars(record["key"], record, step):
      self.writer.add_scalar(tag, value, at)

  def losses(self, tag: str, first_step: int, losses) -> None:
    """One epoch's per-step training losses, the first at global step ``first_step``."""
    for i, loss in enumerate(losses):
      self.writer.add_scalar(f"{tag}/train_loss", float(loss), first_step + i)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def _is_number(value) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _scalars(tag: str, value, step: int):
  """(tag, float, step) of every number in a record, by path."""
  if _is_number(value):
    yield tag, float(value), step
  elif isinstance(value, dict):
    for key, item in value.items():
      if key not in ("experiment", "key", "epoch"):
        yield from _scalars(f"{tag}/{key}", item, step)
  elif isinstance(value, (list, tuple)):
    if value and all(_is_number(v) for v in value):
      if len(value) <= MAX_SERIES:
        for i, v in enumerate(value):
          yield tag, float(v), i
    else:
      for i, item in enumerate(value):
        if isinstance(item, (dict, list, tuple)):
          yield from _scalars(f"{tag}/{i}", item, step)
