"""`Task`: what an experiment trains and probes — a model, its loss, the fixed training subset,
the fixed probe batch, and the `TaskPreset` it was built from, carried whole (as nanodo passes
its config) so that a new preset field reaches the programs that read it in one hop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

import optclip.models as models
from experiments.presets import TaskPreset
from optclip.data import batching


@dataclasses.dataclass
class Task:
  name: str
  model: Any
  loss_fn: Callable          # (params, batch) -> scalar
  train: dict                # {field: array (N, ...)}, the fixed training subset
  test_batch: dict           # the fixed probe batch (Appendix B.3's "test batch")
  preset: TaskPreset         # what the task was built from (batch size, micro-batch, ...)
  info: dict                 # source, sizes, hashes: recorded in config.json
  pretrained: Any = None     # params of a checkpoint folder: every seed starts there
  pretrained_state: Any = None  # and its model state (BatchNorm statistics), if it has one

  @property
  def batch_size(self) -> int:
    return self.preset.batch_size

  @property
  def batches_per_epoch(self) -> int:
    return len(next(iter(self.train.values()))) // self.batch_size

  def epoch_batches(self, seed: int, epoch: int):
    """The batches of one epoch, in the seed's order for that epoch (same shapes always)."""
    order = batching.epoch_order(len(next(iter(self.train.values()))), seed, epoch)
    for b in range(self.batches_per_epoch):
      index = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])
      yield {k: v[index] for k, v in self.train.items()}

  def init_params(self, seed: int):
    if self.pretrained is not None:
      return self.pretrained
    return models.init_params(self.model, jax.random.PRNGKey(seed))

  def init_model_state(self, seed: int):
    """What the model keeps besides its parameters ({"batch_stats": ...} for a ResNet),
    None for a model without."""
    if models.make_state_loss_fn(self.model) is None:
      return None
    if self.pretrained_state is not None:
      return self.pretrained_state
    return models.init_params(self.model, jax.random.PRNGKey(seed), with_state=True)[1]
