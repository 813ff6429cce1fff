"""The four tasks of the paper, built from a preset: data, tokenizer, model and loss.

Everything is deterministic given the seed: the fixed training subset, the fixed probe batch
(Appendix B.3's "test batch"), the code task's input masks where the preset asks for them
(drawn once) and the order of batches in every epoch.

The code task is a plain causal language model on raw tokens, as the paper's code trains it
(``tasks/autoregressive.py`` returns the tokens as both inputs and labels); Appendix B.1's
text speaks of fixed masks drawn with p = 0.15 at the start, which ``mask_probability``
gives.

The probe batch stands in for the full-batch training objective: by default it is a fixed
random subset of the training subset, as in the paper's code (Appendix B.3 "Test Batch";
Section 5: only the training loss matters). ``probe_batch="held-out"`` draws it from
examples outside the training subset instead, a reading the report labels as such.

Where the preset asks for pretraining (the quick and smoke presets; the paper fine-tunes
pretrained models, Table 2), the offline corpus is split once into a pretraining half and a
fine-tuning half: `experiments.tasks.pretraining` trains the model and its tokenizer on the first
and saves a checkpoint folder, from which every seed starts as with ``--checkpoint``; the
training subset and probe batch come from the second half.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, NamedTuple

import jax
import numpy as np

import optclip.models as models
from experiments.errors import UsageError
from experiments.presets import TaskPreset
from experiments.tasks import pretraining
from experiments.tasks.task import Task
from optclip.data import batching, classification, code, images, tokenization, translation
from optclip.data.common import DataNotFound

PROBE_BATCH_SOURCES = ("train", "held-out")
# The model family each task trains (a --checkpoint folder must hold one of these).
CHECKPOINT_FAMILIES = {"translation": "t5", "code": "gpt_neo", "classification": "bert",
                       "images": "resnet"}


def _indices_hash(indices) -> str:
  return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


def _split(total: int, preset: TaskPreset, seed: int, probe_batch: str, source: dict,
           unit: str = "examples"):
  """(train, probe) index arrays into ``range(total)``, and what config.json records.

  A shortfall is a `UsageError` naming the data's folder and splits, what they hold and
  what the preset needs.
  """
  if probe_batch not in PROBE_BATCH_SOURCES:
    raise UsageError(f"probe_batch must be one of {PROBE_BATCH_SOURCES}, got {probe_batch!r}")
  held_out = probe_batch == "held-out"
  needed = preset.train_size + (preset.test_size if held_out else 0)
  if needed > total or preset.test_size > preset.train_size:
    splits = source.get("splits")
    where = source.get("source", "the data") + (
        " (splits: " + ", ".join(f"{k} {v} rows" for k, v in splits.items()) + ")"
        if splits else "")
    raise UsageError(f"{where} gives {total} usable {unit}; the preset needs "
                     f"{preset.train_size} for training (train_size) with a probe batch of "
                     f"{preset.test_size} (test_size) {'held out' if held_out else 'among them'}")
  train = batching.fixed_subset(total, preset.train_size, seed)
  if held_out:
    probe = batching.fixed_subset(total, preset.test_size, seed + 10_000, exclude=train)
  else:
    probe = np.sort(train[batching.fixed_subset(len(train), preset.test_size, seed + 10_000)])
  info = {"source": ("held-out examples (outside the training subset)" if held_out
                     else "a fixed random subset of the training subset"),
          "size": len(probe), "indices_sha256": _indices_hash(probe)}
  return train, probe, info


def _load(loader, *args, **kwargs):
  try:
    return loader(*args, **kwargs)
  except DataNotFound as error:
    raise UsageError(str(error)) from error


def _model(preset: TaskPreset, **overrides):
  base = models.PRESETS[preset.model]
  fields = {f.name for f in dataclasses.fields(base)}
  return models.create(base, **{k: v for k, v in overrides.items() if k in fields})


def _from_checkpoint(name, checkpoint):
  """(tokenizer, special ids, model, params) of a checkpoint folder, checked for the task."""
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
  return tokenizer, special, model, params


class _Family(NamedTuple):
  """How one text task turns its examples into fixed-shape batches and a model."""
  texts: Callable  # examples -> the texts a tokenizer is trained on
  prepare: Callable  # (examples, tokenizer, special, preset) -> the units subsets are drawn from
  encode: Callable  # (units, tokenizer, special, preset, seed) -> data dict
  model_overrides: Callable  # preset -> model config overrides
  tokenizer_from_all: bool  # train the tokenizer on the pool (else on the training subset)


def _encode_translation(pairs, tokenizer, special, preset, seed):
  encode = lambda texts: tokenization.encode(tokenizer, texts, max_length=preset.max_length,
                                             eos_id=special.eos)
  english, french = encode([p[0] for p in pairs]), encode([p[1] for p in pairs])
  source_length = batching.bucket_length(map(len, english), _buckets(preset.max_length))
  target_length = batching.bucket_length(map(len, french), _buckets(preset.max_length))
  return batching.translation_batch(english, french, source_length, target_length,
                                    special.pad)


def _buckets(max_length: int):
  return tuple(b for b in (8, 16, 32, 64, 128, 256, 512) if b < max_length) + (max_length,)


def _code_blocks(documents, tokenizer, special, preset):
  """Documents concatenated and cut into blocks of the preset's length."""
  return batching.lm_blocks(tokenization.encode(tokenizer, documents, max_length=10 ** 9,
                                                eos_id=special.eos), preset.max_length)


def _encode_code(blocks, tokenizer, special, preset, seed):
  masks = batching.fixed_masks(blocks.shape, preset.mask_probability, seed)
  return batching.masked_lm_batch(blocks, masks, special.mask)


def _encode_classification(examples, tokenizer, special, preset, seed):
  texts, labels = examples
  ids = tokenization.encode(tokenizer, texts, max_length=preset.max_length, eos_id=special.eos)
  input_ids, mask = batching.pad_batch(ids, preset.max_length, special.pad)
  return {"input_ids": input_ids, "attention_mask": mask, "label": np.asarray(labels)}


_AS_IS = lambda examples, tokenizer, special, preset: examples
FAMILIES = {
    "translation": _Family(lambda pairs: [t for p in pairs for t in p], _AS_IS,
                           _encode_translation, lambda preset: {}, False),
    # Code: the tokenizer is trained on every other document (a fixed half), then all
    # documents are cut into blocks from which the subsets are drawn.
    "code": _Family(lambda documents: documents[::2], _code_blocks, _encode_code,
                    lambda preset: {"max_position_embeddings": max(
                        preset.max_length,
                        models.PRESETS[preset.model].max_position_embeddings)}, True),
    "classification": _Family(lambda examples: list(examples[0]), _AS_IS,
                              _encode_classification, lambda preset: {"num_labels": 2}, False),
}


def _take(examples, index):
  if isinstance(examples, tuple):  # (texts, labels)
    return ([examples[0][i] for i in index], np.asarray(examples[1])[index])
  if isinstance(examples, np.ndarray):
    return examples[index]
  return [examples[i] for i in index]


def _size(examples) -> int:
  return len(examples[0]) if isinstance(examples, tuple) else len(examples)


def _read(name, preset: TaskPreset, data_dir):
  if name == "translation":
    if preset.source == "paper":
      return _load(translation.opus_books, data_dir)
    return _load(translation.gettext_pairs)
  if name == "code":
    if preset.source == "paper":
      return _load(code.the_stack_smol, data_dir)
    return _load(code.stdlib_sources, max_chars=4000)
  if preset.source == "paper":
    texts, labels, info = _load(classification.imdb, data_dir)
  else:
    pairs, _ = _load(translation.gettext_pairs)
    texts, labels, info = classification.language_identification(pairs, seed=0)
  return (texts, labels), info


def _model_for(name, preset):
  return lambda vocab_size: _model(preset, vocab_size=vocab_size,
                                   **FAMILIES[name].model_overrides(preset))


def _pretrained_folder(name, preset, examples, cache_dir):
  """The checkpoint folder of the model pretrained on ``examples`` (see `pretraining`)."""
  family = FAMILIES[name]
  tokenizer = tokenization.train_tokenizer(family.texts(examples), preset.vocab_size,
                                           cache_dir=cache_dir)
  special = tokenization.DEFAULT_SPECIAL_IDS
  units = family.prepare(examples, tokenizer, special, preset)
  chosen = batching.fixed_subset(_size(units), min(preset.pretrain_size, _size(units)),
                                 pretraining.SEED)
  data = family.encode(_take(units, chosen), tokenizer, special, preset, pretraining.SEED)
  model = _model_for(name, preset)(tokenizer.get_vocab_size())
  return pretraining.checkpoint_folder(name, model, tokenizer, data, preset, cache_dir)


def _text_task(name, preset: TaskPreset, seed, data_dir, cache_dir, checkpoint,
               probe_batch) -> Task:
  family = FAMILIES[name]
  examples, info = _read(name, preset, data_dir)
  if checkpoint is None and preset.pretrain_size:
    pretrain, pool = pretraining.split(_size(examples))
    checkpoint, info["pretraining"] = _pretrained_folder(name, preset,
                                                         _take(examples, pretrain), cache_dir)
    examples = _take(examples, pool)
  if checkpoint is not None:
    tokenizer, special, model, pretrained = _from_checkpoint(name, checkpoint)
    info.update(tokenizer=f"from {checkpoint}", checkpoint=checkpoint,
                vocab_size=model.config.vocab_size)
  else:
    tokenizer, special, model, pretrained = None, tokenization.DEFAULT_SPECIAL_IDS, None, None
  if tokenizer is None and family.tokenizer_from_all:
    tokenizer = tokenization.train_tokenizer(family.texts(examples), preset.vocab_size,
                                             cache_dir=cache_dir)
  if tokenizer is not None:
    examples = family.prepare(examples, tokenizer, special, preset)
  train, probe, info["probe_batch"] = _split(
      _size(examples), preset, seed, probe_batch, info,
      f"{preset.max_length}-token blocks" if name == "code" else "examples")
  if tokenizer is None:
    tokenizer = tokenization.train_tokenizer(family.texts(_take(examples, train)),
                                             preset.vocab_size, cache_dir=cache_dir)
  if model is None:
    model = _model_for(name, preset)(tokenizer.get_vocab_size())
    info.update(tokenizer="byte-level BPE (local)", vocab_size=tokenizer.get_vocab_size())
  _check_model(name, model, preset, checkpoint)
  encode = lambda index: family.encode(_take(examples, index), tokenizer, special, preset, seed)
  train_data, probe_data = _encoded(encode, train, probe)
  info.update(train_examples=len(train), probe_examples=len(probe))
  return Task(name, model, models.make_loss_fn(model), train_data, probe_data, preset, info,
              pretrained)


def _encoded(encode, train, probe):
  """(training data, probe batch): a probe batch drawn from the training subset is made of
  its rows, exactly as trained on (the code task's masks included); a held-out one is
  encoded with the training subset, for the same padded lengths."""
  if np.isin(probe, train).all():
    data = encode(train)
    rows = np.searchsorted(train, probe)
    return data, {k: v[rows] for k, v in data.items()}
  data = encode(np.concatenate([train, probe]))
  n = len(train)
  return {k: v[:n] for k, v in data.items()}, {k: v[n:] for k, v in data.items()}


def _check_model(name, model, preset, checkpoint):
  config = model.config
  if name == "code" and config.max_position_embeddings < preset.max_length:
    raise UsageError(f"--checkpoint code={checkpoint}: {config.max_position_embeddings} "
                     f"positions, the preset's blocks have {preset.max_length} tokens")
  if name == "classification" and config.num_labels != 2:
    raise UsageError(f"--checkpoint classification={checkpoint}: a binary classifier is "
                     f"needed, the folder's has {config.num_labels} labels")


def _resnet_from_checkpoint(checkpoint, num_channels: int, num_labels: int):
  """(model, params, state) of a ResNet checkpoint folder for a task of ``num_labels``
  classes: the paper fine-tunes an ImageNet-pretrained ResNet-152 on CIFAR-10 (its code:
  ``torchvision.models.resnet152(pretrained=True)``), so a head of another size is replaced
  by a fresh one."""
  from optclip.models import convert
  try:
    model, params, state = convert.load_pretrained(checkpoint, with_state=True)
  except (FileNotFoundError, convert.CheckpointError) as error:
    raise UsageError(f"--checkpoint images={checkpoint}: {error}") from error
  if model.config.model_type != "resnet":
    raise UsageError(f"--checkpoint images={checkpoint}: the images task trains a resnet "
                     f"model, the folder holds {model.config.model_type}")
  if model.config.num_channels != num_channels:
    raise UsageError(f"--checkpoint images={checkpoint}: {model.config.num_channels} input "
                     f"channels, the images have {num_channels}")
  if model.config.num_labels != num_labels:
    model = models.create(model.config, num_labels=num_labels)
    fresh = models.init_params(model, jax.random.PRNGKey(0))
    params = {**params, "classifier": fresh["classifier"]}
  return model, params, state


def images_task(preset: TaskPreset, seed: int, data_dir=None, cache_dir=None,
                checkpoint=None, probe_batch: str = "train") -> Task:
  if preset.source == "paper":
    pixels, labels, info = _load(images.cifar10, data_dir)
  else:
    loaded = images.digits()
    pixels, labels, info = loaded if loaded is not None else images.synthetic_shapes()
  pixels = (pixels - pixels.mean()) / (pixels.std() + 1e-8)
  as_data = lambda index: {"pixels": pixels[index].astype(np.float32),
                           "label": labels[index].astype(np.int32)}
  num_labels = int(labels.max()) + 1
  model = _model(preset, num_channels=pixels.shape[-1], num_labels=num_labels)
  pretrained = state = None
  if checkpoint is None and preset.pretrain_size:
    # As the text tasks: pretrained on a half of the images fine-tuning never sees.
    half, pool = pretraining.split(len(labels))
    chosen = half[batching.fixed_subset(len(half), min(preset.pretrain_size, len(half)),
                                        pretraining.SEED)]
    checkpoint, info["pretraining"] = pretraining.checkpoint_folder(
        "images", model, None, as_data(chosen), preset, cache_dir)
    pixels, labels = pixels[pool], labels[pool]
  if checkpoint is not None:
    model, pretrained, state = _resnet_from_checkpoint(checkpoint, pixels.shape[-1],
                                                       num_labels)
    info["checkpoint"] = checkpoint
  train, probe, info["probe_batch"] = _split(len(labels), preset, seed, probe_batch, info)
  train_data, probe_data = _encoded(as_data, train, probe)
  info = {**info, "train_examples": len(train), "probe_examples": len(probe),
          "image_shape": list(pixels.shape[1:])}
  return Task("images", model, models.make_loss_fn(model), train_data, probe_data, preset,
              info, pretrained, state or None)


def build(name: str, preset, seed: int, data_dir=None, cache_dir=None, checkpoints=None) -> Task:
  checkpoint = (checkpoints or {}).get(name)
  task_preset = getattr(preset, name)
  if name == "images":
    return images_task(task_preset, seed, data_dir, cache_dir, checkpoint, preset.probe_batch)
  return _text_task(name, task_preset, seed, data_dir, cache_dir, checkpoint,
                    preset.probe_batch)
