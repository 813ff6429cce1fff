"""Timing helpers shared by the benchmark scripts."""

import time

import jax


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


def temp_bytes(jitted, *args) -> int:
  """Bytes of temporaries XLA allocates for one call (from the compiled memory analysis)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", 0))
