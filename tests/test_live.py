"""--tensorboard: the event files read back (parsed here from the TFRecord framing and the
Event protocol buffer, independently of the writer) hold the run's training losses per step
and the numbers metrics.jsonl has."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from experiments.__main__ import main

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_events(folder):
  """{tag: {step: value}} of every scalar in the folder's event files."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4  # length, its CRC, the record, its CRC
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.mark.slow  # a whole smoke ResNet run: 113 s of the default suite on 2026-12-07
def test_tensorboard_mirrors_step_losses_and_every_record(tmp_path):
  out, board = str(tmp_path / "run"), str(tmp_path / "board")
  assert main(["resnet", "--preset", "smoke", "--out", out, "--tensorboard", board]) == 0
  scalars = read_events(board)
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  trains = [r for r in records if r["key"].endswith("/train")]
  assert trains
  for record in trains:
    unit = record["key"].rsplit("/epoch", 1)[0]
    steps = scalars[f"{unit}/train_loss"]
    epoch = record["epoch"]
    per_epoch = len(steps) // max(r["epoch"] for r in trains if r["key"].startswith(unit))
    losses = [steps[s] for s in range((epoch - 1) * per_epoch, epoch * per_epoch)]
    np.testing.assert_allclose(np.mean(losses), record["train_loss"], rtol=1e-5)
  probe = next(r for r in records if r["key"].endswith("/probe"))
  assert scalars[f"{probe['key']}/loss"][probe["epoch"]] == pytest.approx(probe["loss"],
                                                                            rel=1e-6)
  curve = probe["landscape"][0] if isinstance(probe["landscape"][0], list) else None
  if curve is not None:
    got = scalars[f"{probe['key']}/landscape/0"]
    np.testing.assert_allclose([got[i] for i in range(len(curve))], curve, rtol=1e-6)
