"""Command line: ``python -m experiments <command> [--preset P] [--seeds ...] [--out DIR]
[--resume]``. ``reproduce`` runs every experiment; ``report DIR`` rebuilds a report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

from experiments.errors import RunError, UsageError


def _parser():
  from experiments import registry
  parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  commands = {e.name: e.help for e in registry.EXPERIMENTS}
  commands["reproduce"] = "every experiment, then the report"
  for name, help_text in commands.items():
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--preset", default="quick", help="smoke, quick or paper (default quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (default: the preset's, 3 for quick and paper)")
    p.add_argument("--out", default=None, help="run folder (default runs/<command>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--data-dir", default=None,
                   help="folder with the paper's data sets saved by `datasets` (paper preset)")
    p.add_argument("--cache-dir", default=None,
                   help="tokenizers and pretrained mini models, reused by later runs "
                        "(default $OPTCLIP_CACHE or ~/.cache/optclip)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="TASK=FOLDER",
                   help="start a task from a local Hugging Face checkpoint folder, with its "
                        "tokenizer (translation=<t5 folder>, code=<gpt-neo folder>, "
                        "classification=<bert folder>); repeatable")
    p.add_argument("--mesh", default=None,
                   help="device mesh such as data=2,fsdp=4 (parameters FSDP-sharded, batches "
                        "along data)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard event files to DIR (training loss per step, "
                        "clip statistics, every probe record; needs the tensorboard extra)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   dest="overrides",
                   help="override a preset field (dotted for a task's: translation.batch_size"
                        "=8); repeatable, type-checked")
    p.add_argument("--random-init", action="store_true",
                   help="with --preset paper, start tasks without --checkpoint from random "
                        "weights instead of refusing")
  report = sub.add_parser("report", help="rebuild report.md of a run folder from its metrics")
  report.add_argument("dir")
  plan = sub.add_parser("plan", help="parameters, memory, FLOPs and time of a preset, without "
                                     "running a step")
  plan.add_argument("--preset", default="paper", help="smoke, quick or paper (default paper)")
  plan.add_argument("--seeds", type=int, default=None, help="number of seeds (default the "
                                                            "preset's)")
  plan.add_argument("--mesh", default=None, help="plan per device for a mesh such as "
                                                 "data=2,fsdp=4")
  plan.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    dest="overrides", help="as for the experiments")
  plan.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the device's peak (default 989, an H100's dense bf16)")
  plan.add_argument("--utilization", type=float, default=0.3,
                    help="the fraction of the peak assumed reached (default 0.3)")
  plan.add_argument("--device", action="append", default=[], metavar="NAME",
                    help="compare with a device's usable memory and find the largest "
                         "micro-batch that fits it (repeatable; e.g. a100-80gb, a100-40gb)")
  plan.add_argument("--tasks", default=None, metavar="NAMES",
                    help="plan only these tasks, comma-separated (default all: translation, "
                         "code, classification, images)")
  return parser


def main(argv=None, *, after_checkpoint=None) -> int:
  """Runs the command line; returns the exit code (2 for usage errors, nothing written).

  ``after_checkpoint(unit, epoch)``, if given, runs after every checkpoint save (the
  resume tests use it to kill the process at a known point).
  """
  args = _parser().parse_args(argv)
  try:
    if args.command == "plan":
      return _plan(args, argv)
    if args.command == "report":
      from experiments import report
      report.build(args.dir)
      print(f"wrote {os.path.join(args.dir, 'report.md')}")
      return 0
    return _run(args, after_checkpoint)
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except RunError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1


def _plan(args, argv) -> int:
  """The planner; a --mesh of more CPU devices than there are re-runs it with XLA's host
  device count raised (before JAX starts), so its programs compile for the real mesh."""
  from experiments import presets
  from experiments.setup import overrides
  if args.preset not in presets.PRESETS:
    raise UsageError(f"--preset {args.preset!r} is unknown; choose one of "
                     f"{sorted(presets.PRESETS)}")
  preset, applied = overrides.apply(presets.PRESETS[args.preset], args.overrides)
  mesh = None
  if args.mesh:
    from optclip import sharding
    try:
      needed = int(np.prod(list(sharding.parse_mesh_spec(args.mesh).values())))
    except ValueError as error:
      raise UsageError(f"--mesh: {error}") from error
    import jax
    if len(jax.devices()) < needed and jax.default_backend() == "cpu":
      flag = f"--xla_force_host_platform_device_count={needed}"
      if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.execv(sys.executable, [sys.executable, "-m", "experiments",
                                  *(sys.argv[1:] if argv is None else argv)])
    try:
      mesh = sharding.mesh_from_spec(args.mesh)
    except ValueError as error:
      raise UsageError(f"--mesh: {error}") from error
  from experiments import plan
  unknown = [d for d in args.device if d not in plan.DEVICES]
  if unknown:
    raise UsageError(f"--device {unknown[0]!r} is unknown; known: {sorted(plan.DEVICES)}")
  tasks = plan.TASKS if args.tasks is None else tuple(args.tasks.split(","))
  if not tasks or any(t not in plan.TASKS for t in tasks):
    raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of "
                     f"{list(plan.TASKS)}")
  seeds = args.seeds or len(preset.seeds)
  print(f"# plan: preset {preset.name}" + (f", overrides {applied}" if applied else "")
        + f", {seeds} seed(s), mesh {args.mesh or 'none (one device)'}\n")
  import jax
  usable = min((plan.usable_bytes(d) for d in args.device), default=None)
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with context:
    rows = plan.plan(preset, seeds, mesh, usable, tasks)
    print(plan.table(rows, args.peak_tflops, args.utilization,
                     1 if mesh is None else mesh.size, args.device))
    print("\n" + plan.programs_table(rows))
    for device in args.device:
      print(f"\nLargest micro-batch that fits {device} ({plan.DEVICES[device]} GiB, "
            f"{plan.usable_bytes(device) / plan.GIB:.1f} GiB usable):")
      for name, kind in (("translation", "transformer"), ("code", "transformer"),
                         ("classification", "training")):
        if name not in tasks:
          continue
        size, peak = plan.largest_microbatch(preset, name, kind, plan.usable_bytes(device),
                                             mesh)
        print(f"- {name}: " + (f"--set {name}.microbatch_size={size} (peak "
                               f"{peak / plan.GIB:.1f} GiB)" if size else
                               f"none (at 1 example the peak is {peak / plan.GIB:.1f} GiB)"))
  print("\nPeaks are XLA's memory analysis of the run's own compiled programs at full size "
        "(arguments + outputs + temporaries - donated aliases), plus what stays resident "
        "between them; see experiments/plan.py.")
  return 0


def _check_microbatches_on(mesh, preset) -> None:
  """A batch split over n devices micro-batches in sizes that are multiples of n (each
  micro-batch takes its share from every device's block): refused before anything runs."""
  from optclip import sharding
  for name in ("translation", "code", "classification", "images"):
    task = getattr(preset, name)
    if not task.microbatch_size:
      continue
    for size in (task.batch_size, task.test_size):
      spec = sharding.batch_spec_for((size,), mesh)[0]
      axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
      devices = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if task.microbatch_size % devices:
        raise UsageError(
            f"{name}.microbatch_size={task.microbatch_size}: on --mesh {dict(mesh.shape)} a "
            f"batch of {size} is split over {devices} devices, so a micro-batch must be a "
            f"multiple of {devices}")


def default_cache_dir() -> str:
  return os.environ.get("OPTCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "optclip")


def _initialize_distributed() -> bool:
  """Joins JAX's multi-process runtime when launched as one of several processes.

  Triggered by JAX_COORDINATOR_ADDRESS (set it, with JAX_NUM_PROCESSES and JAX_PROCESS_ID, on
  GPU hosts; JAX itself reads only the address), a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts) or a SLURM
  job with several tasks; `jax.distributed.initialize` reads the rest from the environment.

  When a process dies, the others must not wait in a collective for ever: JAX's
  coordination service notices the missing heartbeats and stops every other process with
  a message naming the lost one ("tasks are unhealthy (stopped sending heartbeats): 1")
  within OPTCLIP_HEARTBEAT_SECONDS (default 100, JAX's); `--resume` on all of them then
  continues from the last checkpoint. CPU processes (tests, laptops) talk through gloo.
  """
  multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or multi_host_tpu or slurm):
    return False
  import jax
  heartbeat = os.environ.get("OPTCLIP_HEARTBEAT_SECONDS", "100")
  if not heartbeat.isdigit() or int(heartbeat) < 1:
    raise UsageError(f"OPTCLIP_HEARTBEAT_SECONDS={heartbeat!r}: expected a whole number of "
                     "seconds, at least 1")
  # JAX reads only the coordinator's address from the environment; the process count and
  # index of a hand-launched job (GPU hosts) come from these two.
  counts = {}
  for name, argument in (("JAX_NUM_PROCESSES", "num_processes"),
                         ("JAX_PROCESS_ID", "process_id")):
    value = os.environ.get(name)
    if value is not None:
      if not value.isdigit():
        raise UsageError(f"{name}={value!r}: expected a whole number")
      counts[argument] = int(value)
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat), **counts)
  return True


def _checkpoints(values) -> dict:
  """["translation=/ckpt/t5", ...] -> {"translation": "/ckpt/t5"}, checked before any work."""
  from experiments import tasks
  checkpoints = {}
  for value in values:
    name, _, folder = value.partition("=")
    if name not in tasks.CHECKPOINT_FAMILIES or not folder:
      raise UsageError(f"--checkpoint {value!r}: expected TASK=FOLDER with TASK one of "
                       f"{sorted(tasks.CHECKPOINT_FAMILIES)}")
    if not os.path.isdir(folder):
      raise UsageError(f"--checkpoint {value!r}: {folder} is not a folder (optclip never "
                       "downloads checkpoints)")
    checkpoints[name] = os.path.abspath(folder)
  return checkpoints


def _run(args, after_checkpoint) -> int:
  """Preflight (every check that can fail, nothing written yet), then the experiments."""
  from experiments import presets, registry, report
  from experiments.artifacts import run_folder
  from experiments.artifacts.metrics import Metrics
  from experiments.setup import overrides, preflight
  from experiments.setup.context import Context
  if args.preset not in presets.PRESETS:
    raise UsageError(f"--preset {args.preset!r} is unknown; choose one of "
                     f"{sorted(presets.PRESETS)}")
  preset, applied = overrides.apply(presets.PRESETS[args.preset], args.overrides)
  if preset.name == "paper" and not args.data_dir:
    raise UsageError("--preset paper reads the paper's data sets from --data-dir "
                     "(opus_books, the-stack-smol, imdb, cifar10 saved with `datasets`); "
                     "optclip never downloads them")
  if args.seeds is not None and not args.seeds:
    raise UsageError("--seeds needs at least one seed")
  seeds = tuple(args.seeds) if args.seeds else preset.seeds
  out = args.out or os.path.join("runs", f"{args.command}-{preset.name}")
  mesh = None
  if args.mesh:
    _initialize_distributed()
    from optclip import sharding
    try:
      mesh = sharding.mesh_from_spec(args.mesh)
    except ValueError as error:
      raise UsageError(f"--mesh: {error}") from error
    _check_microbatches_on(mesh, preset)
  checkpoints = _checkpoints(args.checkpoint)
  live = None
  if args.tensorboard:
    from experiments.artifacts.live import TensorBoard
    live = TensorBoard(args.tensorboard)
  experiments = ([e for e in registry.EXPERIMENTS if e.in_reproduce]
                 if args.command == "reproduce" else [registry.BY_NAME[args.command]])
  needed = list(dict.fromkeys(t for e in experiments for t in e.tasks))
  if preset.name == "paper":
    preflight.require_checkpoints(needed, checkpoints, args.random_init)
  run_folder.check(out, args.resume)
  previous = run_folder.read_config(out) if os.path.isdir(out) else {}
  if args.resume and previous and previous.get("preset") != preset.name:
    raise UsageError(f"--resume: {out} was run with preset {previous.get('preset')!r}, "
                     f"not {preset.name!r}")
  ctx = Context(preset, seeds, out, None, args.data_dir, args.cache_dir or
                default_cache_dir(), mesh, checkpoints, after_checkpoint, live=live)
  built = [ctx.task(name, seeds[0]) for name in needed]  # data, sizes, checkpoints, models
  preflight.check_disk(out, preflight.checkpoint_bytes(built))
  run_folder.prepare(out, args.resume)
  ctx.metrics = Metrics(out, ctx.live)
  run_folder.write_config(out, {"command": args.command, "preset": preset.name,
                                "overrides": applied, "seeds": list(seeds), "mesh": args.mesh,
                                "checkpoints": {name: {"folder": folder,
                                                       "sha256": _folder_hash(folder)}
                                                for name, folder in checkpoints.items()},
                                "random_init": args.random_init,
                                "preset_values": dataclasses.asdict(preset),
                                "environment": run_folder.environment()})
  start = time.time()
  try:
    for experiment in experiments:
      began = time.time()
      experiment.run(ctx)
      run_folder.write_config(out, {"data": ctx.data_info})
      print(f"[{experiment.name}] done in {time.time() - began:.0f} s", flush=True)
  finally:
    if live is not None:
      live.close()
  elapsed = round(time.time() - start + previous.get("wall_time_s", 0.0), 1)
  run_folder.write_config(out, {"wall_time_s": elapsed})
  report.build(out)
  print(f"wrote {out}/report.md ({elapsed:.0f} s)")
  for line in report.verdict_lines(out):
    print(" -", line)
  return 0


def _folder_hash(folder: str) -> str:
  """sha256 over a checkpoint folder's weight files, by name: identifies its weights."""
  import hashlib
  digest = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    if name.endswith((".safetensors", ".bin", ".json")) and name != "pretraining.json":
      digest.update(name.encode())
      with open(os.path.join(folder, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
  return digest.hexdigest()[:16]


if __name__ == "__main__":
  sys.exit(main())
