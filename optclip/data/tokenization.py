"""Tokenizers trained locally with the `tokenizers` library, cached on disk.

Byte-level BPE (no unknown tokens, fine for code and accented French alike). Special tokens
come first with fixed ids, T5-style: <pad>=0, </s>=1, <unk>=2, <mask>=3. The cache key is the
training texts' hash and the vocabulary size, so a changed corpus retrains.
"""

from __future__ import annotations

import os

from optclip.data.common import content_hash

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<mask>")
PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(4)


def train_tokenizer(texts, vocab_size: int, *, cache_dir: str | None = None):
  """A byte-level BPE tokenizer trained on ``texts`` (list of str)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  key = f"bpe-{vocab_size}-{content_hash(texts)}.json"
  path = os.path.join(cache_dir, key) if cache_dir else None
  if path and os.path.exists(path):
    return Tokenizer.from_file(path)
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    tokenizer.save(tmp)
    os.replace(tmp, path)
  return tokenizer


def encode(tokenizer, texts, *, max_length: int, add_eos: bool = True):
  """Token ids per text, truncated to ``max_length`` (</s> kept last when ``add_eos``)."""
  out = []
  for encoding in tokenizer.encode_batch(list(texts)):
    ids = encoding.ids[: max_length - int(add_eos)]
    out.append(ids + [EOS_ID] if add_eos else ids)
  return out
