"""Our Flax T5, GPT-Neo, BERT classifier and ResNet, with HF checkpoint loading.

Each family module has a config dataclass, ``PRESETS`` of named sizes (the paper's and tiny
ones), the Flax module, and pure ``loss_fn(model, params, batch)`` / ``logits_fn``.
``make_loss_fn(model)`` closes over the model to give the ``loss_fn(params, batch)`` the
geometry toolkit and the trainers use.
"""

from __future__ import annotations

import functools

from optclip.models import bert, gpt_neo, resnet, t5
from optclip.models.convert import (FAMILIES, CheckpointError, config_from_hf, config_to_hf,
                                    init_variables, load_pretrained, save_pretrained)

PRESETS = {**t5.PRESETS, **gpt_neo.PRESETS, **bert.PRESETS, **resnet.PRESETS}

__all__ = ["CheckpointError", "PRESETS", "create", "family", "init_params", "load_pretrained",
           "make_logits_fn", "make_loss_fn", "make_objective", "make_state_loss_fn",
           "save_pretrained",
           "config_from_hf", "config_to_hf"]


def family(model_or_config):
  config = getattr(model_or_config, "config", model_or_config)
  return FAMILIES[config.model_type][2]


def create(name_or_config, **overrides):
  """A model from a preset name (e.g. 't5-small', 'gpt-neo-tiny') or a config dataclass."""
  import dataclasses
  if isinstance(name_or_config, str):
    if name_or_config not in PRESETS:
      raise ValueError(f"model: unknown preset {name_or_config!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name_or_config]
  else:
    config = name_or_config
  if overrides:
    config = dataclasses.replace(config, **overrides)
  return FAMILIES[config.model_type][1](config)


def init_params(model, key, *, with_state: bool = False):
  """Random parameters (the HF initialisation scheme) for ``model``."""
  variables = dict(init_variables(model, key))
  params = variables.pop("params")
  return (params, variables) if with_state else params


def make_loss_fn(model, mode: str = "train"):
  """``loss_fn(params, batch) -> scalar`` for the model's family.

  ``mode="eval"`` differs only for a model with state (ResNet's BatchNorm): it uses the
  running statistics, which the batch then carries as ``batch["model_state"]``.
  """
  if mode not in ("train", "eval"):
    raise ValueError(f"make_loss_fn: mode must be 'train' or 'eval', got {mode!r}")
  module = family(model)
  if mode == "eval" and hasattr(module, "eval_loss_fn"):
    return functools.partial(module.eval_loss_fn, model)
  return functools.partial(module.loss_fn, model)


def make_objective(model, mode: str = "train", microbatch_size: int = 0):
  """The model's loss as an `optclip.microbatch.Objective` (the loss, the sum of its terms
  and their count over a batch), micro-batched by ``microbatch_size`` examples (0: the whole
  batch at once, the same program as `make_loss_fn`).

  A ResNet's training-mode loss is not a sum over examples (BatchNorm's batch statistics
  couple them): it cannot be micro-batched; its evaluation mode can.
  """
  from optclip.microbatch import Objective
  module = family(model)
  summed = module.eval_loss_sum if (mode == "eval" and hasattr(module, "eval_loss_sum")) \
      else getattr(module, "loss_sum", None)
  if microbatch_size and (summed is None or (mode == "train" and
                                             hasattr(module, "train_loss_and_state"))):
    raise ValueError(f"microbatch_size={microbatch_size}: the {model.config.model_type} "
                     f"model's {mode}-mode loss is not a sum over examples (BatchNorm's batch "
                     "statistics couple them); micro-batch only its evaluation mode")
  return Objective(make_loss_fn(model, mode),
                   functools.partial(summed, model) if summed is not None else None,
                   functools.partial(module.loss_count, model), microbatch_size,
                   shared=("model_state",))


def make_state_loss_fn(model):
  """``(params, model_state, batch) -> (loss, new model_state)`` in training mode for a
  model with state ({"batch_stats": ...} for ResNet), or None for a model without."""
  module = family(model)
  if not hasattr(module, "train_loss_and_state"):
    return None

  def loss_and_state(params, model_state, batch):
    loss, stats = module.train_loss_and_state(model, params, model_state["batch_stats"],
                                              batch)
    return loss, {"batch_stats": stats}
  return loss_and_state


def make_logits_fn(model):
  return functools.partial(family(model).logits_fn, model)
