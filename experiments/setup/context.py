"""What every experiment receives: the preset, seeds, run folder, metrics and options."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from experiments import tasks
from experiments.artifacts.metrics import Metrics
from experiments.training import loop


@dataclasses.dataclass
class Context:
  preset: Any
  seeds: tuple
  out: str
  metrics: Metrics
  data_dir: str | None = None
  cache_dir: str | None = None
  mesh: Any = None
  checkpoints: dict = dataclasses.field(default_factory=dict)  # task name -> HF folder
  # Runs after every checkpoint save, with (unit, epoch); tests inject one that kills.
  after_checkpoint: Callable | None = None
  # What each task was built from (source, sizes, hashes), for config.json.
  data_info: dict = dataclasses.field(default_factory=dict)
  # Built tasks by (name, seed, task preset): preflight builds the first seed's, the
  # experiments reuse them.
  built: dict = dataclasses.field(default_factory=dict)
  # ``--tensorboard DIR``: an `experiments.artifacts.live.TensorBoard`, or None.
  live: Any = None

  def task(self, name: str, seed: int):
    key = (name, seed, getattr(self.preset, name), self.preset.probe_batch)
    if key not in self.built:
      self.built[key] = tasks.build(name, self.preset, seed, self.data_dir, self.cache_dir,
                                    self.checkpoints)
    self.data_info[name] = self.built[key].info
    return self.built[key]

  def checkpointing(self, unit: str, epochs) -> loop.Checkpointing:
    return loop.Checkpointing(self.out, unit, frozenset(epochs), self.after_checkpoint)
