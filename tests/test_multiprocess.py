"""Two JAX processes on this machine (4 CPU devices each, jax.distributed on localhost, gloo
collectives) against one: the sharded clipped-Adam step, the clipping threshold and a
K-direction sharpness on a data=2,fsdp=4 mesh spanning both processes equal the
single-process results (bit for bit for the threshold, 1e-6 for the rest), so do the
curvature suite's Lanczos and SLQ estimates (rtol 1e-5; density moments), and an orbax
checkpoint written by the two processes restores in one (tests/multiprocess/worker.py); when
one process dies the other stops within the heartbeat timeout, naming it."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess", "worker.py")
DIES = os.path.join(ROOT, "tests", "multiprocess", "dies.py")


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


# 64 s on 2026-12-07 (three JAX processes, each compiling); the default suite keeps two
# processes on jax.distributed in the test below.
@pytest.mark.slow
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
  # The curvature suite's pytree Lanczos and SLQ across both processes: the same estimates.
  curvature = [k for k in one.files if k.startswith("curvature_")]
  vectors = [k for k in curvature if k.startswith("curvature_eigenvectors_")]
  assert len(vectors) == 4 and len(curvature) == 15, curvature
  # Eigenvectors are defined up to sign: |⟨v_two, v_one⟩| = 1 over all leaves, per pair.
  overlap = sum(np.sum((multi[k] * one[k]).reshape(2, -1), axis=1) for k in vectors)
  np.testing.assert_allclose(np.abs(overlap), 1.0, atol=1e-5)
  for key in sorted(set(curvature) - set(vectors)):
    if "weights" in key:  # quadrature weights amplify rounding; their moments agree
      nodes = key.replace("weights", "nodes")
      for power in range(1, 5):
        np.testing.assert_allclose(np.sum(multi[key] * multi[nodes] ** power),
                                   np.sum(one[key] * one[nodes] ** power), rtol=1e-5,
                                   err_msg=f"{key} moment {power}")
      continue
    np.testing.assert_allclose(multi[key], one[key], rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(one[key]))), err_msg=key)
  # The checkpoint the two processes wrote, restored by one, holds the original parameters.
  restored = [k for k in one.files if k.startswith("restored_")]
  assert len(restored) == 4
  for key in restored:
    np.testing.assert_array_equal(one[key], one["params_" + key[len("restored_"):]], key)


def test_when_one_process_dies_the_other_stops_naming_it():
  """Process 1 exits after the first collective; process 0, summing over both every 0.2 s,
  is stopped by JAX's coordination service within the 5 s heartbeat timeout set through
  OPTCLIP_HEARTBEAT_SECONDS (plus start-up), with a message naming task 1, instead of
  waiting in the collective."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=ROOT, OPTCLIP_HEARTBEAT_SECONDS="5",
             JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
  started = time.time()
  workers = [subprocess.Popen([sys.executable, "-u", DIES], env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  output = [worker.communicate(timeout=120)[0] for worker in workers]
  assert workers[1].returncode == 3, output[1][-2000:]
  assert workers[0].returncode != 0, output[0][-2000:]
  assert "process 0: step 0 sums 4.0" in output[0], output[0][-2000:]
  assert "never stopped" not in output[0]
  assert "stopped sending heartbeats" in output[0], output[0][-2000:]
  lost = output[0].split("stopped sending heartbeats")[1].split("\n")[1].strip()
  assert lost == "1", output[0][-2000:]
  assert time.time() - started < 90
