"""What every experiment receives: the preset, seeds, run folder and metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments import common, tasks


@dataclasses.dataclass
class Context:
  preset: Any
  seeds: tuple
  out: str
  metrics: common.Metrics
  data_dir: str | None = None
  cache_dir: str | None = None
  mesh: Any = None
  checkpoints: dict = dataclasses.field(default_factory=dict)  # task name -> HF folder

  def task(self, name: str, seed: int):
    task = tasks.build(name, self.preset, seed, self.data_dir, self.cache_dir,
                       self.checkpoints)
    common.write_config(self.out, {"data": {name: task.info}})
    return task
