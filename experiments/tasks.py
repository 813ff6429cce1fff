"""The four tasks of the paper, built from a preset: data, tokenizer, model and loss.

Everything is deterministic given the seed: the fixed training subset, the fixed test batch,
the masks of the code task (drawn once, p = 0.15) and the order of batches in every epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

import optclip.models as models
from optclip.data import batching, classification, code, images, tokenization, translation
from optclip.data.common import DataNotFound
from experiments.run_folder import UsageError
from experiments.presets import TaskPreset

MASK_PROBABILITY = 0.15


@dataclasses.dataclass
class Task:
  name: str
  model: Any
  loss_fn: Callable          # (params, batch) -> scalar
  train: dict                # {field: array (N, ...)}, the fixed training subset
  test_batch: dict           # the fixed test batch the probes use
  batch_size: int
  info: dict                 # source, sizes, hashes: recorded in config.json
  pretrained: Any = None     # params of a --checkpoint folder: every seed starts there

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


def _split(total: int, preset: TaskPreset, seed: int):
  if preset.train_size + preset.test_size > total:
    raise UsageError(f"the data has {total} examples; the preset needs "
                     f"{preset.train_size} train + {preset.test_size} test")
  train = batching.fixed_subset(total, preset.train_size, seed)
  test = batching.fixed_subset(total, preset.test_size, seed + 10_000, exclude=train)
  return train, test


def _load(loader, *args, **kwargs):
  try:
    return loader(*args, **kwargs)
  except DataNotFound as error:
    raise UsageError(str(error)) from error


def _model(preset: TaskPreset, **overrides):
  base = models.PRESETS[preset.model]
  fields = {f.name for f in dataclasses.fields(base)}
  return models.create(base, **{k: v for k, v in overrides.items() if k in fields})


# The model family each task trains (a --checkpoint folder must hold one of these).
CHECKPOINT_FAMILIES = {"translation": "t5", "code": "gpt_neo", "classification": "bert"}


def _tokenizer_and_model(name, preset, texts, checkpoint, cache_dir, **overrides):
  """The trained tokenizer and a fresh preset model, or both from a checkpoint folder.

  Returns (tokenizer, special ids, model, pretrained params or None, tokenizer info).
  """
  if checkpoint is None:
    tokenizer = tokenization.train_tokenizer(texts, preset.vocab_size, cache_dir=cache_dir)
    model = _model(preset, vocab_size=tokenizer.get_vocab_size(), **overrides)
    return (tokenizer, tokenization.DEFAULT_SPECIAL_IDS, model, None,
            {"tokenizer": "byte-level BPE (local)", "vocab_size": tokenizer.get_vocab_size()})
  from optclip.models import convert
  try:
    tokenizer, special = tokenization.load_checkpoint_tokenizer(checkpoint)
    model, params = convert.load_pretrained(checkpoint)
  except (FileNotFoundError, convert.CheckpointError) as error:
    raise UsageError(f"--checkpoint {name}={checkpoint}: {error}") from error
  family = model.config.model_type
  if family != CHECKPOINT_FAMILIES[name]:
    raise UsageError(f"--checkpoint {name}={checkpoint}: the {name} task trains a "
                     f"{CHECKPOINT_FAMILIES[name]} model, the folder holds {family}")
  if tokenizer.get_vocab_size() > model.config.vocab_size:
    raise UsageError(f"--checkpoint {name}={checkpoint}: the tokenizer has "
                     f"{tokenizer.get_vocab_size()} tokens, the model only "
                     f"{model.config.vocab_size} embeddings")
  return (tokenizer, special, model, params,
          {"tokenizer": f"from {checkpoint}", "checkpoint": checkpoint,
           "vocab_size": model.config.vocab_size})


def translation_task(preset: TaskPreset, seed: int, data_dir=None, cache_dir=None,
                     checkpoint=None) -> Task:
  if preset.source == "paper":
    pairs, info = _load(translation.opus_books, data_dir)
  else:
    pairs, info = _load(translation.gettext_pairs)
  train, test = _split(len(pairs), preset, seed)
  tokenizer, special, model, pretrained, tokenizer_info = _tokenizer_and_model(
      "translation", preset, [t for i in train for t in pairs[i]], checkpoint, cache_dir)
  chosen = [pairs[i] for i in np.concatenate([train, test])]
  encode = lambda texts: tokenization.encode(tokenizer, texts, max_length=preset.max_length,
                                             eos_id=special.eos)
  english, french = encode([p[0] for p in chosen]), encode([p[1] for p in chosen])
  source_length = batching.bucket_length(map(len, english), _buckets(preset.max_length))
  target_length = batching.bucket_length(map(len, french), _buckets(preset.max_length))
  data = batching.translation_batch(english, french, source_length, target_length, special.pad)
  n = len(train)
  info = {**info, "train_examples": n, "test_examples": len(test),
          "source_length": source_length, "target_length": target_length, **tokenizer_info}
  return Task("translation", model, models.make_loss_fn(model),
              {k: v[:n] for k, v in data.items()}, {k: v[n:] for k, v in data.items()},
              preset.batch_size, info, pretrained)


def _buckets(max_length: int):
  return tuple(b for b in (8, 16, 32, 64, 128, 256, 512) if b < max_length) + (max_length,)


def code_task(preset: TaskPreset, seed: int, data_dir=None, cache_dir=None,
              checkpoint=None) -> Task:
  if preset.source == "paper":
    texts, info = _load(code.the_stack_smol, data_dir)
  else:
    texts, info = _load(code.stdlib_sources, max_chars=4000)
  # The tokenizer is trained on every other document (a fixed half), then all documents are
  # cut into blocks from which the fixed train/test subsets are drawn.
  tokenizer, special, model, pretrained, tokenizer_info = _tokenizer_and_model(
      "code", preset, texts[::2], checkpoint, cache_dir,
      max_position_embeddings=max(preset.max_length,
                                  models.PRESETS[preset.model].max_position_embeddings))
  if model.config.max_position_embeddings < preset.max_length:
    raise UsageError(f"--checkpoint code={checkpoint}: {model.config.max_position_embeddings} "
                     f"positions, the preset's blocks have {preset.max_length} tokens")
  blocks = batching.lm_blocks(tokenization.encode(tokenizer, texts, max_length=10 ** 9,
                                                  eos_id=special.eos), preset.max_length)
  train, test = _split(len(blocks), preset, seed)
  chosen = blocks[np.concatenate([train, test])]
  masks = batching.fixed_masks(chosen.shape, MASK_PROBABILITY, seed)
  data = batching.masked_lm_batch(chosen, masks, special.mask)
  n = len(train)
  info = {**info, "train_blocks": n, "test_blocks": len(test), "block_length": preset.max_length,
          "mask_probability": MASK_PROBABILITY, **tokenizer_info}
  return Task("code", model, models.make_loss_fn(model), {k: v[:n] for k, v in data.items()},
              {k: v[n:] for k, v in data.items()}, preset.batch_size, info, pretrained)


def classification_task(preset: TaskPreset, seed: int, data_dir=None, cache_dir=None,
                        checkpoint=None) -> Task:
  if preset.source == "paper":
    texts, labels, info = _load(classification.imdb, data_dir)
  else:
    pairs, _ = _load(translation.gettext_pairs)
    texts, labels, info = classification.language_identification(pairs, seed=0)
  train, test = _split(len(texts), preset, seed)
  tokenizer, special, model, pretrained, tokenizer_info = _tokenizer_and_model(
      "classification", preset, [texts[i] for i in train], checkpoint, cache_dir, num_labels=2)
  if model.config.num_labels != 2:
    raise UsageError(f"--checkpoint classification={checkpoint}: a binary classifier is "
                     f"needed, the folder's has {model.config.num_labels} labels")
  index = np.concatenate([train, test])
  ids = tokenization.encode(tokenizer, [texts[i] for i in index], max_length=preset.max_length,
                            eos_id=special.eos)
  input_ids, mask = batching.pad_batch(ids, preset.max_length, special.pad)
  data = {"input_ids": input_ids, "attention_mask": mask, "label": labels[index]}
  n = len(train)
  info = {**info, "train_examples": n, "test_examples": len(test), **tokenizer_info}
  return Task("classification", model, models.make_loss_fn(model),
              {k: v[:n] for k, v in data.items()}, {k: v[n:] for k, v in data.items()},
              preset.batch_size, info, pretrained)


def images_task(preset: TaskPreset, seed: int, data_dir=None, cache_dir=None,
                checkpoint=None) -> Task:
  if checkpoint is not None:
    raise UsageError("--checkpoint: the images task trains a ResNet from scratch (Table 9); "
                     "checkpoints are read for translation, code and classification")
  if preset.source == "paper":
    pixels, labels, info = _load(images.cifar10, data_dir)
  else:
    loaded = images.digits()
    pixels, labels, info = loaded if loaded is not None else images.synthetic_shapes()
  pixels = (pixels - pixels.mean()) / (pixels.std() + 1e-8)
  train, test = _split(len(labels), preset, seed)
  index = np.concatenate([train, test])
  data = {"pixels": pixels[index].astype(np.float32), "label": labels[index].astype(np.int32)}
  n = len(train)
  model = _model(preset, num_channels=pixels.shape[-1], num_labels=int(labels.max()) + 1)
  info = {**info, "train_examples": n, "test_examples": len(test),
          "image_shape": list(pixels.shape[1:])}
  return Task("images", model, models.make_loss_fn(model), {k: v[:n] for k, v in data.items()},
              {k: v[n:] for k, v in data.items()}, preset.batch_size, info)


BUILDERS = {"translation": translation_task, "code": code_task,
            "classification": classification_task, "images": images_task}


def build(name: str, preset, seed: int, data_dir=None, cache_dir=None, checkpoints=None) -> Task:
  checkpoint = (checkpoints or {}).get(name)
  return BUILDERS[name](getattr(preset, name), seed, data_dir, cache_dir, checkpoint)
