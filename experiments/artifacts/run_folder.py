"""The run folder: its layout, config.json, and clean failures.

A run folder holds ``config.json``, ``metrics.jsonl`` (see `experiments.artifacts.metrics`),
``tables/``, ``figures/``, ``checkpoints/`` and ``report.md``. Tables, figures and the report
are rebuilt from metrics.jsonl alone.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys

import numpy as np

from experiments.errors import UsageError


def check(out: str, resume: bool) -> None:
  """Refuses a file, or a non-empty folder without resume (touching nothing)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out {out!r} exists and is not a folder")
  if os.path.isdir(out) and os.listdir(out) and not resume:
    raise UsageError(f"--out {out!r} exists and is not empty; pass --resume to continue that "
                     "run, or choose another folder (nothing was overwritten)")


def prepare(out: str, resume: bool) -> None:
  """Creates the folder and its subfolders (after `check`)."""
  check(out, resume)
  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, ".write-test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as error:
    raise UsageError(f"--out {out!r} is not writable: {error}") from error
  for sub in ("tables", "figures", "checkpoints"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)


def environment() -> dict:
  """Versions, platform and devices, recorded in config.json."""
  import jax
  versions = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in ("jax", "jaxlib", "optax", "flax", "chex", "orbax.checkpoint", "numpy",
               "tokenizers", "datasets"):
    try:
      module = __import__(name, fromlist=["__version__"])
      versions[name] = getattr(module, "__version__", "?")
    except ImportError:
      versions[name] = None
  import optclip
  versions["optclip"] = optclip.__version__
  devices = jax.devices()
  return {"versions": versions, "device": f"{len(devices)} × {devices[0].device_kind}",
          "backend": jax.default_backend()}


def write_config(out: str, config: dict) -> None:
  """Merges ``config`` into config.json (a resumed run keeps what it recorded before)."""
  path = os.path.join(out, "config.json")
  current = read_config(out)
  for key, value in config.items():
    if isinstance(value, dict) and isinstance(current.get(key), dict) and key == "data":
      current[key] = {**current[key], **value}  # one entry per task, gathered over the run
    else:
      current[key] = value
  write_json_atomic(path, current)


def read_config(out: str) -> dict:
  path = os.path.join(out, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_json_atomic(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(value), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def jsonable(value):
  """``value`` with arrays as lists and non-finite floats as strings (JSON has neither)."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    array = np.asarray(value)
    return jsonable(array.tolist()) if array.ndim else jsonable(array.item())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # "nan" / "inf": JSON has no literal for them
  return value


def table_path(out: str, name: str, suffix: str) -> str:
  return os.path.join(out, "tables", f"{name}.{suffix}")


def figure_path(out: str, name: str) -> str:
  return os.path.join(out, "figures", f"{name}.png")
