"""Fixed-shape NumPy batches, the paper's fixed subsets and masks, and prefetching.

Every batch of a run has the same shape (sequences are padded to one bucketed length), so a
jitted step compiles once.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from optclip.data.tokenization import MASK_ID, PAD_ID

IGNORE_INDEX = -100


def bucket_length(lengths: Iterable[int], buckets: Sequence[int] = (16, 32, 64, 128, 256, 512)) -> int:
  """The smallest bucket that holds the longest sequence (the largest bucket caps it)."""
  longest = max(lengths, default=1)
  return next((b for b in buckets if b >= longest), buckets[-1])


def pad_batch(sequences: Sequence[Sequence[int]], length: int, pad_value: int = PAD_ID):
  """(len(sequences), length) int32, truncated or padded with ``pad_value``, and its mask."""
  out = np.full((len(sequences), length), pad_value, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, seq in enumerate(sequences):
    seq = list(seq)[:length]
    out[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return out, mask


def translation_batch(sources, targets, source_length: int, target_length: int,
                      pad_id: int = PAD_ID):
  input_ids, attention_mask = pad_batch(sources, source_length, pad_id)
  labels, _ = pad_batch(targets, target_length, IGNORE_INDEX)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_blocks(token_lists: Sequence[Sequence[int]], block_length: int) -> np.ndarray:
  """Documents concatenated and cut into (num_blocks, block_length) (the tail is dropped)."""
  flat = np.fromiter((t for tokens in token_lists for t in tokens), np.int32)
  count = len(flat) // block_length
  return flat[: count * block_length].reshape(count, block_length)


def fixed_masks(shape, probability: float, seed: int) -> np.ndarray:
  """Boolean masks drawn ONCE from the seed (the paper masks with p = 0.15 at the start of
  training and never redraws, so the objective stays fixed)."""
  return np.random.default_rng([seed, 15]).random(shape) < probability


def masked_lm_batch(blocks: np.ndarray, masks: np.ndarray, mask_id: int = MASK_ID):
  """Inputs with masked positions replaced by <mask>; labels are the original tokens."""
  return {"input_ids": np.where(masks, mask_id, blocks).astype(np.int32),
          "attention_mask": np.ones_like(blocks), "labels": blocks.astype(np.int32)}


def fixed_subset(total: int, size: int, seed: int, *, exclude: np.ndarray | None = None):
  """Sorted indices of a random subset of ``range(total)`` chosen once from the seed."""
  pool = np.arange(total)
  if exclude is not None:
    pool = np.setdiff1d(pool, exclude)
  if size > len(pool):
    raise ValueError(f"subset size {size} exceeds the {len(pool)} available examples")
  return np.sort(np.random.default_rng([seed, size]).choice(pool, size, replace=False))


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 7]).permutation(size)


def prefetch(iterator: Iterable, size: int = 2) -> Iterator:
  """Runs ``iterator`` in a background thread, ``size`` items ahead of the consumer."""
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except BaseException as error:  # handed to the consumer
      items.put(error)
    items.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = items.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
