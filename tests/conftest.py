import os
import shutil
import sys
import tempfile

# One XLA persistent compilation cache per test session, shared with the CLI subprocesses the
# tests start (they inherit the environment): a ResNet smoke run spends ~90 s compiling its probe
# step, and every subprocess that runs one used to pay it again. A fresh directory per session, so
# nothing carries over between sessions; jax warns and recompiles on an unreadable entry, so a
# subprocess killed while writing one is harmless. Programs compiled in under a second (jax's
# default threshold) are not cached, so the tests that count compilations still see them.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="optclip-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  if "jax" in sys.modules:  # a plugin imported jax before this file: set it there too
    sys.modules["jax"].config.update("jax_compilation_cache_dir",
                                     os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Scripts the tests run in subprocesses, not test modules (importing them would configure
# this process's JAX).
collect_ignore = ["multiprocess/worker.py", "multiprocess/dies.py", "sharded/check.py",
                  "sharded/spectra.py", "sharded/steady.py", "sharded/probe_point.py",
                  "sharded/smoothness.py",
                  "plan/measure_rss.py"]
