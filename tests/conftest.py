# Scripts the tests run in subprocesses, not test modules (importing them would configure
# this process's JAX).
collect_ignore = ["multiprocess/worker.py", "multiprocess/dies.py", "sharded/check.py",
                  "sharded/spectra.py",
                  "plan/measure_rss.py"]
