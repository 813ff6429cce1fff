"""Data sources, tokenizer, fixed subsets/masks and batching, against direct computations."""

import os

import numpy as np
import pytest

from optclip.data import batching, classification, code, images, tokenization, translation
from optclip.data.common import DataNotFound

HAS_CATALOGUES = os.path.isdir(translation.DEFAULT_LOCALE_DIR)


@pytest.mark.skipif(not HAS_CATALOGUES, reason="no French gettext catalogues on this machine")
def test_gettext_pairs_are_deterministic_unique_and_filtered():
  pairs, info = translation.gettext_pairs(max_chars=80)
  again, info_again = translation.gettext_pairs(max_chars=80)
  assert pairs == again and info["sha256"] == info_again["sha256"]
  assert info["size"] == len(pairs) > 1000
  english = [e for e, _ in pairs]
  assert len(set(english)) == len(english)
  assert all(4 <= len(e) <= 80 and 4 <= len(f) <= 80 and e != f for e, f in pairs)


def test_missing_catalogues_and_datasets_say_what_is_missing(tmp_path):
  with pytest.raises(DataNotFound, match="no gettext catalogues"):
    translation.gettext_pairs(str(tmp_path))
  with pytest.raises(DataNotFound, match=r"opus_books.*never downloads"):
    translation.opus_books(str(tmp_path))
  with pytest.raises(DataNotFound, match="imdb"):
    classification.imdb(None)


def test_stdlib_sources():
  texts, info = code.stdlib_sources(max_files=20, max_chars=500)
  assert 0 < len(texts) <= 20 and all(len(t) <= 500 for t in texts)
  assert info["files"] == len(texts)


def test_language_identification_labels_follow_the_pairs():
  pairs = [("hello there", "bonjour à tous"), ("good night", "bonne nuit")]
  texts, labels, _ = classification.language_identification(pairs, seed=3)
  lookup = {e: 0 for e, _ in pairs} | {f: 1 for _, f in pairs}
  assert sorted(texts) == sorted(lookup) and [lookup[t] for t in texts] == labels.tolist()


def test_synthetic_images_are_deterministic_and_labelled():
  a, la, _ = images.synthetic_shapes(50, 10, seed=1)
  b, lb, _ = images.synthetic_shapes(50, 10, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (50, 10, 10, 1) and set(la.tolist()) <= set(range(10))


def test_tokenizer_special_ids_round_trip_and_cache(tmp_path):
  texts = ["def add(a, b):\n    return a + b", "Fichier introuvable : %s"] * 20
  tok = tokenization.train_tokenizer(texts, 300, cache_dir=str(tmp_path))
  for i, token in enumerate(tokenization.SPECIAL_TOKENS):
    assert tok.token_to_id(token) == i
  assert tok.decode(tok.encode(texts[1]).ids) == texts[1]
  assert len(os.listdir(tmp_path)) == 1
  cached = tokenization.train_tokenizer(texts, 300, cache_dir=str(tmp_path))
  assert cached.encode(texts[0]).ids == tok.encode(texts[0]).ids
  ids = tokenization.encode(tok, texts[:1], max_length=5)[0]
  assert len(ids) == 5 and ids[-1] == tokenization.EOS_ID


def test_padding_blocks_subsets_and_masks():
  out, mask = batching.pad_batch([[5, 6, 7], [8]], 4)
  np.testing.assert_array_equal(out, [[5, 6, 7, 0], [8, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  labels = batching.translation_batch([[1]], [[2, 3]], 2, 3)["labels"]
  np.testing.assert_array_equal(labels, [[2, 3, -100]])
  np.testing.assert_array_equal(batching.lm_blocks([[1, 2, 3], [4, 5]], 2), [[1, 2], [3, 4]])
  assert batching.bucket_length([3, 17], (8, 16, 32)) == 32
  assert batching.bucket_length([300], (8, 16, 32)) == 32
  train = batching.fixed_subset(100, 30, seed=0)
  test = batching.fixed_subset(100, 20, seed=1, exclude=train)
  assert len(set(train) | set(test)) == 50
  np.testing.assert_array_equal(train, batching.fixed_subset(100, 30, seed=0))
  masks = batching.fixed_masks((200, 100), 0.15, seed=0)
  np.testing.assert_array_equal(masks, batching.fixed_masks((200, 100), 0.15, seed=0))
  assert abs(masks.mean() - 0.15) < 0.01
  with pytest.raises(ValueError, match="subset size"):
    batching.fixed_subset(10, 11, seed=0)


def test_prefetch_keeps_order_and_raises_producer_errors():
  assert list(batching.prefetch(iter(range(10)), size=3)) == list(range(10))

  def broken():
    yield 1
    raise RuntimeError("disk gone")

  with pytest.raises(RuntimeError, match="disk gone"):
    list(batching.prefetch(broken()))


def test_checkpoint_tokenizer_files(tmp_path):
  """tokenizer.json with a special-tokens map, GPT-style vocab.json + merges.txt, and the
  refusals (SentencePiece only, nothing), read without transformers."""
  import json
  from tokenizers import ByteLevelBPETokenizer
  texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
  trained = tokenization.train_tokenizer(texts, 300)
  fast = tmp_path / "fast"
  fast.mkdir()
  trained.save(str(fast / "tokenizer.json"))
  (fast / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": {"content": "</s>"}, "pad_token": "<pad>", "mask_token": "<mask>"}))
  tokenizer, special = tokenization.load_checkpoint_tokenizer(str(fast))
  assert special == (trained.token_to_id("<pad>"), trained.token_to_id("</s>"),
                     trained.token_to_id("<mask>"))
  ids = tokenization.encode(tokenizer, ["return x"], max_length=16, eos_id=special.eos)[0]
  assert ids[-1] == special.eos and tokenizer.decode(ids[:-1]) == "return x"

  gpt = tmp_path / "gpt"
  gpt.mkdir()
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
  bpe.save_model(str(gpt))
  tokenizer, special = tokenization.load_checkpoint_tokenizer(str(gpt))
  end = bpe.token_to_id("<|endoftext|>")
  # No pad or mask token in GPT vocabularies: both fall back to end-of-text.
  assert special == (end, end, end)
  assert tokenizer.encode("return x").ids == bpe.encode("return x").ids

  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "spiece.model").write_bytes(b"\0")
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    tokenization.load_checkpoint_tokenizer(str(tmp_path / "t5"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenization.load_checkpoint_tokenizer(str(tmp_path))
