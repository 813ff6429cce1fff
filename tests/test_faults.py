"""Faults that must lose nothing: a metrics.jsonl line cut short, a full disk while a
checkpoint is written."""

import errno
import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.__main__ import main
from experiments.artifacts import checkpoints


def _lines(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return f.read().splitlines()


def test_a_cut_line_loses_no_complete_record_and_none_written_after_it(tmp_path):
  """The last line of metrics.jsonl cut in half (power loss mid-write): `report` keeps every
  whole record; --resume sets the fragment aside, redoes its measurement and appends the
  new records on lines of their own, ending with the uninterrupted run's records."""
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  assert main(["theory", "--preset", "smoke", "--out", whole]) == 0
  assert main(["theory", "--preset", "smoke", "--out", cut]) == 0
  lines = _lines(cut)
  assert len(lines) >= 3
  with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
    f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:len(lines[-1]) // 2])
  assert main(["report", cut]) == 0
  assert main(["quadratic", "--preset", "smoke", "--out", cut, "--resume"]) == 0
  assert main(["theory", "--preset", "smoke", "--out", cut, "--resume"]) == 0
  records = [json.loads(line) for line in _lines(cut)]  # every line whole again
  keys = [r["key"] for r in records]
  assert len(keys) == len(set(keys))
  for line in lines[:-1]:
    assert json.loads(line) in records
  assert any(k.startswith("quadratic") for k in keys)
  expected = {json.loads(l)["key"]: json.loads(l) for l in _lines(whole)}
  got = {r["key"]: r for r in records}
  for key, record in expected.items():  # the cut record, redone, as in the whole run
    assert got[key].keys() == record.keys(), key
  with open(os.path.join(cut, "metrics.jsonl.cut")) as f:
    assert f.read() == lines[-1][:len(lines[-1]) // 2] + "\n"


@pytest.mark.slow  # long on 2 cores (45-210 s): outside the default suite's budget
def test_a_full_disk_while_checkpointing_names_the_folder_and_keeps_the_previous(
    tmp_path, monkeypatch, capsys):
  """The second save runs out of room (orbax's temporary folder half written, then its
  ENOSPC error): the CLI says which checkpoint could not be written and that the previous
  is intact, exits 1, removes only the partial save, and --resume finishes the run."""
  out = str(tmp_path / "run")
  real_write = checkpoints._write
  saves = []

  def write_then_fill_the_disk(path, tree):
    saves.append(path)
    if len(saves) == 2:
      os.makedirs(path + ".orbax-checkpoint-tmp-0", exist_ok=True)
      with open(os.path.join(path + ".orbax-checkpoint-tmp-0", "partial"), "w") as f:
        f.write("x")
      raise ValueError("RESOURCE_EXHAUSTED: Error writing") from OSError(
          errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(path, tree)

  monkeypatch.setattr(checkpoints, "_write", write_then_fill_the_disk)
  assert main(["resnet", "--preset", "smoke", "--out", out]) == 1
  err = capsys.readouterr().err
  failed = saves[1]
  assert f"could not write checkpoint {failed}" in err and "No space left" in err
  directory = os.path.dirname(failed)
  previous = os.path.join(directory, os.path.basename(saves[0]))
  assert f"previous checkpoint {previous} is intact" in err
  assert sorted(os.listdir(directory)) == [os.path.basename(saves[0])]
  assert os.path.exists(os.path.join(out, "metrics.jsonl"))
  assert os.path.exists(os.path.join(out, "config.json"))
  monkeypatch.setattr(checkpoints, "_write", real_write)
  assert main(["resnet", "--preset", "smoke", "--out", out, "--resume"]) == 0


def test_a_real_full_disk_is_reported_and_the_previous_checkpoint_reads_back(tmp_path):
  """The same on a 3 MiB tmpfs (where this machine lets us mount one): orbax's own error."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    out = str(mount / "run")
    small = {"w": jnp.arange(1000, dtype=jnp.float32)}
    checkpoints.save(out, "unit", 1, small)
    noise = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)
    with pytest.raises(checkpoints.RunError, match="No space left on device"):
      checkpoints.save(out, "unit", 2, {"w": jnp.asarray(noise)})
    step, state = checkpoints.restore_latest(out, "unit", small)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000))
    assert os.listdir(checkpoints.checkpoint_dir(out, "unit")) == ["1"]
  finally:
    subprocess.run(["umount", str(mount)], capture_output=True)
