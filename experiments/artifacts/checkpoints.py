"""Orbax checkpoints of training units: checkpoints/<unit>/<step>.

Each unit keeps its two newest steps, so that a damaged newest one (a preemption while the
disk was writing, say) falls back to the one before; unreadable steps are set aside as
``<step>.unreadable`` (never deleted), and orbax's leftover temporary folders are cleared.
A finished unit's steps are discarded once its last record is in metrics.jsonl, so the disk
holds at most one unit's steps at a time.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys

from experiments import host_memory
from experiments.errors import RunError

KEEP = 2  # steps kept per unit
SET_ASIDE = "set-aside"  # see `set_aside`


def checkpoint_dir(out: str, unit: str) -> str:
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit)
  return os.path.join(os.path.abspath(out), "checkpoints", safe)


def save(out: str, unit: str, step: int, state) -> None:
  """Saves ``state`` (a pytree of arrays) as checkpoints/<unit>/<step>.

  Older steps are removed only once the new one is complete (orbax commits it by renaming a
  temporary folder), and the previous one stays as a fallback: a kill during the save loses
  nothing.
  """
  directory = checkpoint_dir(out, unit)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, str(step))
  if not os.path.exists(path):
    try:
      _write(path, state)
    except Exception as error:  # noqa: BLE001 - a full disk reaches us wrapped by orbax
      _remove_partial(directory, str(step))
      previous = _steps(directory)
      kept = (f"the previous checkpoint {os.path.join(directory, str(previous[-1]))} is "
              "intact" if previous else "there was no earlier checkpoint of this unit")
      raise RunError(f"could not write checkpoint {path} ({_reason(error)}); {kept}, and "
                     "--resume continues from it once there is room") from error
  for old in _steps(directory)[:-KEEP]:
    shutil.rmtree(os.path.join(directory, str(old)), ignore_errors=True)


def _reason(error: BaseException) -> str:
  """The root cause's one-line message (orbax wraps the OSError of a full disk)."""
  while error.__cause__ is not None or error.__context__ is not None:
    if isinstance(error, OSError):
      break
    error = error.__cause__ or error.__context__
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  full = str(error) + "".join(str(e) for e in (error.__cause__, error.__context__) if e)
  if "No space left on device" in full or "os_error_code='28'" in full:
    return f"No space left on device; {type(error).__name__}: {text[:160]}"
  return f"{type(error).__name__}: {text[:200]}"


def _remove_partial(directory: str, step: str) -> None:
  """What a failed save of ``step`` left: orbax's temporary folders of it, and the step's
  own folder if it is incomplete (never another step's)."""
  for name in os.listdir(directory):
    if name == step or (name.startswith(step + ".") and "orbax-checkpoint-tmp" in name):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def discard(out: str, unit: str) -> None:
  """Removes a finished unit's steps (its results are in metrics.jsonl, and at the paper's
  sizes each step is tens of GiB); steps set aside as unreadable stay."""
  directory = checkpoint_dir(out, unit)
  for step in _steps(directory):
    shutil.rmtree(os.path.join(directory, str(step)), ignore_errors=True)
  with contextlib.suppress(OSError):
    os.rmdir(directory)  # only if nothing is left in it


def set_aside(out: str, unit: str, tree, *, to: str = "auto"):
  """Moves ``tree`` off the device and frees its buffers there; returns a function that
  brings it back (same values, shapes and shardings).

  Frees the memory of a tree not needed for a while (a probe point reads the parameters,
  not the optimizer states). ``to="host"``: into the host's pinned memory (the
  ``pinned_host`` memory kind, a fast copy each way); ``to="disk"``: written to
  checkpoints/<unit>/set-aside and read back (a leftover folder, from a kill in between,
  is removed by `restore_latest`); ``"auto"``: the host where an accelerator offers pinned
  host memory, else the disk (on a CPU the host memory is the device's own).
  """
  import jax
  if to == "auto":
    device = jax.local_devices()[0]
    kinds = {memory.kind for memory in device.addressable_memories()}
    to = "host" if device.platform != "cpu" and "pinned_host" in kinds else "disk"
  if to == "host":
    shardings = jax.tree.map(lambda leaf: leaf.sharding, tree)
    moved = jax.device_put(tree, jax.tree.map(
        lambda sharding: sharding.with_memory_kind("pinned_host"), shardings))
    jax.block_until_ready(moved)
    for leaf in jax.tree.leaves(tree):
      leaf.delete()
    return lambda: jax.device_put(moved, shardings)
  if to != "disk":
    raise ValueError(f"set_aside: to must be 'auto', 'host' or 'disk', got {to!r}")
  return _set_aside_on_disk(os.path.join(checkpoint_dir(out, unit), SET_ASIDE), tree)


def _set_aside_on_disk(path: str, tree):
  """`set_aside` to the disk: each addressable shard's raw bytes in a file of this
  process's own folder, a leaf freed as soon as it is written, so the memory only falls.

  Not orbax, as `save` is: its save of t5-small's 20 probe states (5.6 GiB in 4,417 arrays)
  grew the process by over 4 GiB within 20 s, having written 20 MB, and the run was killed
  for memory (2026-12-07). Nothing here outlives the run, so no format is needed.
  """
  import jax
  import numpy as np
  own = os.path.join(path, f"process{jax.process_index()}")
  shutil.rmtree(own, ignore_errors=True)
  os.makedirs(own)
  leaves, treedef = jax.tree.flatten(tree)
  layouts = []
  for i, leaf in enumerate(leaves):
    shards = []
    for j, shard in enumerate(leaf.addressable_shards):
      file = os.path.join(own, f"{i}.{j}")
      np.asarray(shard.data).tofile(file)
      shards.append((file, shard.data.shape, shard.device))
    layouts.append((leaf.shape, leaf.dtype, leaf.sharding, shards))
    leaf.delete()
  host_memory.return_freed()

  def bring_back():
    arrays = []
    for shape, dtype, sharding, shards in layouts:
      pieces = [jax.device_put(np.fromfile(file, dtype).reshape(piece), device)
                for file, piece, device in shards]
      arrays.append(jax.make_array_from_single_device_arrays(shape, sharding, pieces))
    shutil.rmtree(own, ignore_errors=True)
    with contextlib.suppress(OSError):
      os.rmdir(path)  # once every process has taken its own back
    return jax.tree.unflatten(treedef, arrays)

  return bring_back


def _steps(directory: str) -> list:
  """The committed steps of a unit, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def latest(out: str, unit: str):
  """The newest saved step of ``unit``, or None."""
  steps = _steps(checkpoint_dir(out, unit))
  return steps[-1] if steps else None


def restore_latest(out: str, unit: str, like):
  """``(step, state)`` from the newest readable checkpoint of ``unit``, or ``(0, like)``.

  Orbax's leftover temporary folders (a save cut short) are removed first. A checkpoint
  that cannot be read is reported in one line, renamed ``<step>.unreadable`` and the one
  before it tried; with none left the unit starts over.
  """
  directory = checkpoint_dir(out, unit)
  if not os.path.isdir(directory):
    return 0, like
  for name in os.listdir(directory):
    if "orbax-checkpoint-tmp" in name or name.startswith(SET_ASIDE):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  for step in reversed(_steps(directory)):
    try:
      with _quiet_async_failures():
        return step, restore(out, unit, step, like)
    except Exception as error:  # noqa: BLE001 - any failure to read means: not usable
      path = os.path.join(directory, str(step))
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      reason = reason.split(". See full")[0][:160]
      print(f"warning: checkpoint {path} is unreadable ({type(error).__name__}: {reason}); "
            f"kept as {path}.unreadable, resuming from the one before it", file=sys.stderr,
            flush=True)
      os.replace(path, f"{path}.unreadable")
  return 0, like


@contextlib.contextmanager
def _quiet_async_failures():
  """Orbax reads arrays in asyncio tasks; when one read fails, the others die with the
  event loop and Python prints their errors as "Exception ignored" tracebacks while they
  are collected. The failure itself is reported once, by the caller."""
  saved = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = saved


def restore(out: str, unit: str, step: int, like):
  """Restores checkpoints/<unit>/<step> with the structure, shapes and shardings of ``like``."""
  return _read(os.path.join(checkpoint_dir(out, unit), str(step)), _abstract(like))


def _abstract(tree):
  """Structure, shapes, dtypes and shardings of ``tree``, without its values."""
  import jax
  import orbax.checkpoint as ocp
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _write(path: str, tree) -> None:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)


def _read(path: str, abstract):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract)
