"""The paper's four tasks: the `Task` type, how each is built from its preset (data,
tokenizer, model, loss), and the pretraining stage of the scaled-down presets."""

from experiments.tasks.build import CHECKPOINT_FAMILIES, build
from experiments.tasks.task import Task

__all__ = ["CHECKPOINT_FAMILIES", "Task", "build"]
