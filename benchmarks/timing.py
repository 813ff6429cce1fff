"""Timing helpers shared by the benchmark scripts."""

import time

import jax
import numpy as np


def time_ms(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn(*args) in milliseconds, after compiling and warming up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  times.sort()
  return times[len(times) // 2]


def interleaved_ms(calls: dict, rounds: int = 7) -> dict:
  """{name: per-round times in ms}: every round times each call once, in turn.

  A machine's speed drifts by tens of percent between seconds, so ratios are taken round by
  round (like with like) rather than between medians measured minutes apart.
  """
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      times[name].append(time_ms(call, repeats=1, warmup=0))
  return {name: np.asarray(t) for name, t in times.items()}


def median_ratio(times: np.ndarray, baseline: np.ndarray) -> float:
  """Median over rounds of times / baseline (see `interleaved_ms`)."""
  return float(np.median(times / baseline))


def temp_bytes(jitted, *args) -> int:
  """Bytes of temporaries XLA allocates for one call (from the compiled memory analysis)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", 0))
