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


def load_local_dataset(data_dir: str | None, name: str, how_to: str):
  """A `datasets.Dataset` saved with ``save_to_disk`` under ``data_dir/name``.

  Raises DataNotFound naming the folder and the command that creates it.
  """
  path = os.path.join(data_dir or "", name)
  if not data_dir or not os.path.isdir(path):
    raise DataNotFound(
        f"data set {name!r} is not available locally: expected a `datasets` folder at "
        f"{path or '<--data-dir>/' + name}. optclip never downloads; on a machine with "
        f"internet run\n  {how_to}\nand copy the folder there (then pass --data-dir).")
  import datasets
  data = datasets.load_from_disk(path)
  if isinstance(data, datasets.DatasetDict):
    data = data["train"]
  return data, path
