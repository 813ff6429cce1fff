# Scripts the tests run in subprocesses, not test modules (importing them would configure
# this process's JAX).
collect_ignore = ["multiprocess/worker.py", "sharded/check.py"]
