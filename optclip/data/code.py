"""Python source code for the autoregressive task.

Offline default: the Python standard library's own ``.py`` files (``sysconfig`` stdlib path,
without site-packages and the test suite), in sorted path order. The paper's data set
(the-stack-smol, Python) is read from a local `datasets` folder.
"""

from __future__ import annotations

import glob
import os
import sysconfig

from optclip.data.common import DataNotFound, content_hash, load_local_dataset


def stdlib_sources(*, max_files: int | None = None, max_chars: int = 20000):
  """The stdlib's .py files as texts (each truncated to ``max_chars``)."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if not any(part in ("site-packages", "test", "tests", "idlelib")
                            for part in os.path.relpath(f, root).split(os.sep)))
  if not files:
    raise DataNotFound(f"no Python sources under {root}")
  texts = []
  for file in files[:max_files]:
    try:
      with open(file, encoding="utf-8") as handle:
        texts.append(handle.read(max_chars))
    except (UnicodeDecodeError, OSError):
      continue
  info = {"source": f"Python standard library {root}", "files": len(texts),
          "size": sum(len(t) for t in texts), "sha256": content_hash(texts)}
  return texts, info


THE_STACK_SMOL = ("python -c \"import datasets; datasets.load_dataset("
                  "'bigcode/the-stack-smol', data_dir='data/python')"
                  ".save_to_disk('DATA/the-stack-smol')\"")


def the_stack_smol(data_dir: str | None):
  """Python files of the-stack-smol from ``data_dir/the-stack-smol`` (the paper's code task
  is Python: its ``data/python`` subset), ``content`` column, every split."""
  data, path, splits = load_local_dataset(data_dir, "the-stack-smol", THE_STACK_SMOL,
                                          ("content",))
  texts = list(data["content"])
  return texts, {"source": path, "splits": splits, "files": len(texts),
                 "size": sum(map(len, texts)), "sha256": content_hash(texts)}
