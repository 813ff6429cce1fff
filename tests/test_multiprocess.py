"""Two JAX processes on this machine (4 CPU devices each, jax.distributed on localhost, gloo
collectives) against one: the sharded clipped-Adam step, the clipping threshold and a
K-direction sharpness on a data=2,fsdp=4 mesh spanning both processes equal the
single-process results (bit for bit for the threshold, 1e-6 for the rest), and an orbax
checkpoint written by the two processes restores in one (tests/multiprocess/worker.py)."""

import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess", "worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(process_id, processes, port, out):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["PYTHONPATH"] = ROOT
  return subprocess.Popen([sys.executable, WORKER, str(process_id), str(processes), str(port),
                           out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_equal_one(tmp_path):
  out = str(tmp_path)
  port = _free_port()
  workers = [_launch(i, 2, port, out) for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, output[-4000:]
  single = _launch(0, 1, 0, out)
  output, _ = single.communicate(timeout=600)
  assert single.returncode == 0, output[-4000:]
  multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
  np.testing.assert_array_equal(multi["threshold"], one["threshold"])
  np.testing.assert_allclose(multi["sharpness"], one["sharpness"], rtol=1e-6)
  updates = [k for k in one.files if k.startswith("update_")]
  assert len(updates) == 4
  for key in updates:
    np.testing.assert_allclose(multi[key], one[key], rtol=1e-6, atol=1e-12, err_msg=key)
  # The checkpoint the two processes wrote, restored by one, holds the original parameters.
  restored = [k for k in one.files if k.startswith("restored_")]
  assert len(restored) == 4
  for key in restored:
    np.testing.assert_array_equal(one[key], one["params_" + key[len("restored_"):]], key)
