"""Binary text classification for the Gauss-Newton experiment (Table 8).

Offline default: language identification on the gettext pairs — each pair gives its English
sentence label 0 and its French sentence label 1, so both classes share topics and lengths.
The paper's data set (IMDB sentiment) is read from a local `datasets` folder.
"""

from __future__ import annotations

import numpy as np

from optclip.data.common import content_hash, load_local_dataset


def language_identification(pairs, *, seed: int = 0):
  """(texts, labels, info) from (en, fr) pairs, shuffled deterministically."""
  texts = [t for pair in pairs for t in pair]
  labels = np.tile(np.array([0, 1], np.int32), len(pairs))
  order = np.random.default_rng(seed).permutation(len(texts))
  texts = [texts[i] for i in order]
  labels = labels[order]
  info = {"source": "English vs French sentences of the gettext pairs", "size": len(texts),
          "sha256": content_hash(texts)}
  return texts, labels, info


IMDB = ("python -c \"import datasets; datasets.load_dataset('imdb')"
        ".save_to_disk('DATA/imdb')\"")


def imdb(data_dir: str | None):
  """IMDB sentiment from ``data_dir/imdb``: every labelled split of the hub's DatasetDict
  (train and test; the unlabelled "unsupervised" split, label -1, is left out)."""
  data, path, splits = load_local_dataset(
      data_dir, "imdb", IMDB, ("text", "label"),
      usable=lambda part: part.filter(lambda label: label >= 0, input_columns="label"))
  texts, labels = list(data["text"]), np.asarray(data["label"], np.int32)
  return texts, labels, {"source": path, "splits": splits, "size": len(texts),
                         "sha256": content_hash(texts)}
