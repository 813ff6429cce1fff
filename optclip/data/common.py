"""Helpers shared by the data sources: content hashes and locally saved `datasets`."""

from __future__ import annotations

import hashlib
import os
from typing import Iterable


class DataNotFound(FileNotFoundError):
  """A data set was asked for and is not on this machine (we never download)."""


def content_hash(items: Iterable) -> str:
  """sha256 over the items' text, in order: identifies exactly what a run trained on."""
  digest = hashlib.sha256()
  for item in items:
    digest.update(repr(item).encode("utf-8"))
    digest.update(b"\0")
  return digest.hexdigest()[:16]


def load_local_dataset(data_dir: str | None, name: str, how_to: str,
                       columns: tuple = (), usable=None):
  """Every split of a `datasets` folder saved with ``save_to_disk`` under ``data_dir/name``.

  A DatasetDict contributes all its splits, in sorted order (a plain Dataset is one split,
  "train"); ``usable(split_dataset) -> Dataset`` may drop rows no task can use (IMDB's
  unlabelled "unsupervised" split, say).

  Returns:
    ``(rows, path, splits)``: a `datasets.Dataset` of the usable rows of every split, the
    folder, and {split: usable rows}.

  Raises:
    DataNotFound: naming the folder and the command that creates it, when it is missing or
      lacks one of ``columns``.
  """
  path = os.path.join(data_dir or "", name)
  if not data_dir or not os.path.isdir(path):
    raise DataNotFound(
        f"data set {name!r} is not available locally: expected a `datasets` folder at "
        f"{path or '<--data-dir>/' + name}. optclip never downloads; on a machine with "
        f"internet run\n  {how_to}\nand copy the folder there (then pass --data-dir).")
  import datasets
  try:
    data = datasets.load_from_disk(path)
  except (FileNotFoundError, ValueError) as error:
    raise DataNotFound(f"{path} is not a folder written by `datasets` save_to_disk "
                       f"({error}); create it with\n  {how_to}") from error
  parts = dict(sorted(data.items())) if isinstance(data, datasets.DatasetDict) else {"train": data}
  for split, part in parts.items():
    missing = [c for c in columns if c not in part.column_names]
    if missing:
      raise DataNotFound(f"{path}, split {split!r}: no column {missing[0]!r} (it has "
                         f"{part.column_names}); create the folder with\n  {how_to}")
  if usable is not None:
    parts = {split: usable(part) for split, part in parts.items()}
  splits = {split: len(part) for split, part in parts.items()}
  rows = datasets.concatenate_datasets(list(parts.values())) if len(parts) > 1 else \
      next(iter(parts.values()))
  return rows, path, splits
