"""Tokenizers: trained locally with the `tokenizers` library and cached on disk, or read from
a local Hugging Face checkpoint folder.

Trained ones are byte-level BPE (no unknown tokens, fine for code and accented French alike).
Special tokens come first with fixed ids, T5-style: <pad>=0, </s>=1, <unk>=2, <mask>=3. The
cache key is the training texts' hash and the vocabulary size, so a changed corpus retrains.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

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


class SpecialIds(NamedTuple):
  """Ids of the special tokens the batches use (see `load_checkpoint_tokenizer` for the
  stand-ins of tokenizers without pad or mask tokens)."""
  pad: int = PAD_ID
  eos: int = EOS_ID
  mask: int = MASK_ID


DEFAULT_SPECIAL_IDS = SpecialIds()


def load_checkpoint_tokenizer(folder: str):
  """The tokenizer of a local HF checkpoint folder and its special-token ids.

  Reads ``tokenizer.json`` (any fast tokenizer), or ``vocab.json`` + ``merges.txt`` (GPT-2 /
  GPT-Neo byte-level BPE). Token strings for pad/eos/mask come from
  ``special_tokens_map.json`` or ``tokenizer_config.json`` when present. A folder with only a
  SentencePiece ``spiece.model`` (older T5 checkpoints) is refused with the conversion to run.

  Returns:
    ``(tokenizer, SpecialIds)``.

  Raises:
    FileNotFoundError: naming the folder and the files looked for.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  path = lambda name: os.path.join(folder, name)
  if os.path.exists(path("tokenizer.json")):
    tokenizer = Tokenizer.from_file(path("tokenizer.json"))
  elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
    tokenizer = Tokenizer(models.BPE.from_file(path("vocab.json"), path("merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
  elif os.path.exists(path("spiece.model")):
    raise FileNotFoundError(
        f"{folder} has only a SentencePiece spiece.model; write tokenizer.json once with "
        f"transformers: AutoTokenizer.from_pretrained({folder!r}).save_pretrained({folder!r})")
  else:
    raise FileNotFoundError(f"{folder} has no tokenizer.json nor vocab.json + merges.txt")
  names = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
    if os.path.exists(path(name)):
      with open(path(name)) as f:
        for key, value in json.load(f).items():
          if key in ("pad_token", "eos_token", "unk_token", "mask_token") and value:
            names[key] = value["content"] if isinstance(value, dict) else value

  def token_id(key, fallbacks):
    for token in [names.get(key)] + list(fallbacks):
      if token is not None and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    return None

  eos = token_id("eos_token", ["</s>", "<|endoftext|>"])
  if eos is None:
    raise FileNotFoundError(f"{folder}: no end-of-sequence token (eos_token) in the tokenizer")
  pad = token_id("pad_token", ["<pad>"])
  unk = token_id("unk_token", ["<unk>"])
  mask = token_id("mask_token", ["<mask>", "[MASK]"])
  # GPT-style tokenizers have no pad or mask token: pad with eos (masked out of the loss and
  # attention anyway) and mask with unk, else eos.
  pad = eos if pad is None else pad
  mask = next(i for i in (mask, unk, eos) if i is not None)
  return tokenizer, SpecialIds(pad=pad, eos=eos, mask=mask)


def encode(tokenizer, texts, *, max_length: int, add_eos: bool = True, eos_id: int = EOS_ID):
  """Token ids per text, truncated to ``max_length`` (</s> kept last when ``add_eos``).

  Only the tokenizer's model and pre-tokenizer apply (no template): eos is added here.
  """
  out = []
  for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
    ids = encoding.ids[: max_length - int(add_eos)]
    out.append(ids + [eos_id] if add_eos else ids)
  return out
