"""A pretraining stage for the scaled-down presets: the paper fine-tunes *pretrained*
t5-small, GPT-Neo-125M and BERT-base (Table 2), so the quick and smoke presets first train
their mini models with Adam on a half of their offline corpus that fine-tuning never sees.

The result is an ordinary checkpoint folder (config.json, model.safetensors,
tokenizer.json), cached under ``<cache>/pretrained/`` by a content hash of everything that
determines it (model configuration, data, tokenizer, optimizer, schedule), so a second run
reuses it; tasks then start every seed from it exactly as from ``--checkpoint``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import numpy as np

import optclip.models as models
from experiments.tasks.task import Task
from experiments.training import loop
from experiments.training.variants import Variant
from optclip.models import convert

# Pretraining draws its split and its examples with this seed, whatever the run's seeds.
SEED = 20230601


def split(total: int):
  """(pretraining, fine-tuning) index arrays: a fixed random half of the corpus each."""
  order = np.random.default_rng(SEED).permutation(total)
  half = total // 2
  return np.sort(order[:half]), np.sort(order[half:])


def _content_hash(model, tokenizer, data: dict, preset) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
  if tokenizer is not None:
    digest.update(tokenizer.to_str().encode())
  for key in sorted(data):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(data[key]).tobytes())
  digest.update(json.dumps([preset.pretrain_epochs, preset.pretrain_learning_rate,
                            preset.batch_size, SEED]).encode())
  return digest.hexdigest()[:16]


def checkpoint_folder(name: str, model, tokenizer, data: dict, preset, cache_dir: str):
  """The folder of ``model`` trained on ``data`` with Adam, from the cache or made now (a
  model with state, such as a ResNet's BatchNorm statistics, trains and saves it too;
  ``tokenizer`` is None for images).

  Returns ``(folder, info)``; ``info`` (steps, rates, losses, the hash) goes to config.json.
  """
  key = _content_hash(model, tokenizer, data, preset)
  folder = os.path.join(cache_dir, "pretrained", f"{name}-{key}")
  record = os.path.join(folder, "pretraining.json")
  if os.path.exists(record):
    with open(record) as f:
      return folder, json.load(f)
  # The pretraining data is a task's training set.
  task = Task(f"{name} pretraining", model, models.make_loss_fn(model), data, {}, preset, {})
  tx = Variant("adam").make(preset.pretrain_learning_rate)
  step = loop.train_step(task.loss_fn, tx, loop.model_state_loss(model))
  params, model_state = models.init_params(model, jax.random.PRNGKey(SEED), with_state=True)
  state = loop.initial_state(tx, params, model_state=model_state or None)
  losses = []
  state = loop.run_epochs(
      step, state, lambda epoch: task.epoch_batches(SEED, epoch), preset.pretrain_epochs,
      steps_per_epoch=task.batches_per_epoch,
      on_epoch_end=lambda epoch, state, loss: losses.append(loss),
      description=f"pretraining {name}")
  info = {"hash": key, "examples": len(next(iter(data.values()))),
          "epochs": preset.pretrain_epochs, "steps": preset.pretrain_epochs *
          task.batches_per_epoch, "optimizer": f"adam {preset.pretrain_learning_rate:g}",
          "batch_size": preset.batch_size, "epoch_losses": losses}
  tmp = folder + f".tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  convert.save_pretrained(tmp, model, jax.device_get(state.params),
                          jax.device_get(state.model_state))
  if tokenizer is not None:
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "pretraining.json"), "w") as f:
    json.dump(info, f, indent=2)
  try:
    os.replace(tmp, folder)
  except OSError:  # another process finished the same folder first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder, info
