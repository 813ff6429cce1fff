"""Orbax checkpoints of training units: checkpoints/<unit>/<step>."""

from __future__ import annotations

import os
import shutil


def checkpoint_dir(out: str, unit: str) -> str:
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit)
  return os.path.join(os.path.abspath(out), "checkpoints", safe)


def save(out: str, unit: str, step: int, state) -> None:
  """Saves ``state`` (a pytree of arrays) as checkpoints/<unit>/<step>.

  Older steps of the same unit are kept until the new one is complete, so a kill during the
  save loses nothing.
  """
  import orbax.checkpoint as ocp
  directory = checkpoint_dir(out, unit)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, str(step))
  if not os.path.exists(path):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, state)
  for old in os.listdir(directory):
    if old.isdigit() and int(old) < step:
      shutil.rmtree(os.path.join(directory, old), ignore_errors=True)


def latest(out: str, unit: str):
  """The newest saved step of ``unit``, or None."""
  directory = checkpoint_dir(out, unit)
  if not os.path.isdir(directory):
    return None
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  return steps[-1] if steps else None


def restore(out: str, unit: str, step: int, like):
  """Restores checkpoints/<unit>/<step> with the structure, shapes and shardings of ``like``."""
  import jax
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(checkpoint_dir(out, unit), str(step)), abstract)
