"""``python -m experiments plan``: what a preset costs, before running any step.

The planner compiles the run's own jitted programs at full size from abstract inputs
(`jax.eval_shape`; nothing is allocated): the trajectory's train step with every probe
optimizer riding along, its probe step, every probe program, the convergence sweep's step,
the smoothness step and measurement — each at the preset's micro-batch size,
rematerialisation and landscape batch, on the mesh given. Per program it reads XLA's memory
analysis: arguments + outputs + temporaries − what the outputs alias of donated arguments.
A phase's peak adds what stays resident between its programs: at a probe point the
parameters, the K stacked directions, the probe-batch gradient and SGD's direction, the
probe batch, and the optimizer states unless they are set aside (on disk, or host memory
where the backend has it: the run sets them aside where they would not fit). FLOPs come from
XLA's cost analysis of loop-free programs (one forward, one gradient, one direction's
second derivative) times the counts the probe measurements declare.

``--device NAME`` (repeatable) compares every peak with the device's usable memory (JAX
preallocates 75% of an accelerator; a 5% margin on top) and prints, per task, the largest
micro-batch that fits: the peak is close to linear in the micro-batch size, so two compiles
(the preset's size and half of it) fit a line, and the chosen size is compiled to check.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

import optclip.models as models
from experiments.probing import measurements, probes, trajectory
from experiments.sections import convergence, smoothness
from experiments.training import loop, sweep
from experiments.training.loop import tree_bytes
from experiments.training.variants import Variant
from optclip import blocks as block_partition
from optclip.microbatch import divisors

GIB = 2 ** 30
PREALLOCATED = 0.75  # of an accelerator's memory, what JAX takes by default
MARGIN = 0.05
DEVICES = {  # memory in GiB
    "a100-40gb": 40, "l40s-48gb": 48, "a100-80gb": 80, "h100-80gb": 80, "h200-141gb": 141,
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95,
}


def usable_bytes(device: str) -> float:
  """What a run can use of ``device`` (a name of `DEVICES`)."""
  return DEVICES[device] * GIB * PREALLOCATED * (1 - MARGIN)


class Memory(NamedTuple):
  """XLA's memory analysis of one compiled program, per device."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @property
  def working(self) -> int:
    """What the program adds to its (already resident) arguments."""
    return self.outputs + self.temporaries - self.aliased


def compiled_memory(jitted, *args) -> Memory:
  analysis = jitted.lower(*args).compile().memory_analysis()
  get = lambda name: int(getattr(analysis, name, 0) or 0)
  return Memory(get("argument_size_in_bytes"), get("output_size_in_bytes"),
                get("temp_size_in_bytes"), get("alias_size_in_bytes"))


def _flops(jitted, *args) -> float:
  return float((jitted.lower(*args).cost_analysis() or {}).get("flops", 0.0))


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


class Layout(NamedTuple):
  """How abstract inputs are placed: nothing (one device) or a mesh's specs."""
  mesh: object = None

  def params(self, tree):
    from optclip import sharding
    if self.mesh is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        jax.sharding.NamedSharding(self.mesh, sharding.fsdp_spec(x.shape, self.mesh)))), tree)

  def stacked(self, tree, count: int):
    """``count`` copies of ``tree`` along a leading (unsplit) axis."""
    from optclip import sharding
    if self.mesh is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct((count,) + x.shape, x.dtype), tree)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((count,) + x.shape, x.dtype, sharding=(
        jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
            None, *sharding.fsdp_spec(x.shape, self.mesh))))), tree)

  def batch(self, tree):
    from optclip import sharding
    if self.mesh is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        jax.sharding.NamedSharding(self.mesh, sharding.batch_spec_for(x.shape, self.mesh)))),
        tree)

  @property
  def devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size


def model_and_batch(name: str, preset, size: int | None = None):
  """The task's model at full size and an abstract batch of the preset's shapes (``size``
  examples; default the training batch)."""
  task = getattr(preset, name)
  base = models.PRESETS[task.model]
  fields = {f.name for f in dataclasses.fields(base)}
  overrides = {"vocab_size": task.vocab_size, "num_labels": 2 if name == "classification"
               else 10 if name == "images" else None,
               "num_channels": 3 if name == "images" else None,
               "max_position_embeddings": max(task.max_length,
                                              getattr(base, "max_position_embeddings", 0))}
  model = models.create(base, **{k: v for k, v in overrides.items()
                                 if k in fields and v is not None})
  b, length = size or task.batch_size, task.max_length
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  if name == "images":
    batch = {"pixels": jax.ShapeDtypeStruct((b, length, length, 3), jnp.float32),
             "label": ints(b)}
  elif name == "classification":
    batch = {"input_ids": ints(b, length), "attention_mask": ints(b, length), "label": ints(b)}
  else:
    batch = {"input_ids": ints(b, length), "attention_mask": ints(b, length),
             "labels": ints(b, length)}
  return model, batch


class _Fake:
  """The attributes of a `Task` the step factories read."""

  def __init__(self, model, task_preset):
    self.model, self.preset = model, task_preset


# Compiling the paper's programs takes minutes each on a CPU; `largest_microbatch` asks
# again for sizes the table has already compiled. Keyed by everything the result reads.
_COMPILED: dict = {}


def _trajectory_programs(name, preset, layout: Layout, kind: str) -> dict:
  """{program: Memory} of a trajectory's programs, and the bytes resident between them."""
  key = (name, repr(preset), layout.mesh, kind)
  if key not in _COMPILED:
    _COMPILED[key] = _compile_trajectory_programs(name, preset, layout, kind)
  return _COMPILED[key]


def _compile_trajectory_programs(name, preset, layout: Layout, kind: str) -> dict:
  task_preset = getattr(preset, name)
  model, batch = model_and_batch(name, preset)
  _, probe_batch = model_and_batch(name, preset, task_preset.test_size)
  params = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
  model_state = (jax.eval_shape(lambda k: models.init_params(model, k, with_state=True)[1],
                                jax.random.PRNGKey(0))
                 if models.make_state_loss_fn(model) is not None else None)
  tx = probes.train_transform(probes.TRAJECTORIES[0], 1.0, kind)
  state = jax.eval_shape(lambda p, s: loop.TrainState(p, tx.init(p), s), params, model_state)
  a_state = loop.TrainState(layout.params(state.params), layout.params(state.opt_state),
                            None if model_state is None else layout.params(model_state))
  a_batch, a_probe = layout.batch(batch), layout.batch(probe_batch)
  if model_state is not None:
    a_probe = {**a_probe, "model_state": layout.params(model_state)}
  fake = _Fake(model, task_preset)
  train_step, directions = trajectory.steps(fake, kind, preset, layout.mesh)
  memory = {"train step": compiled_memory(train_step, a_state, a_batch)}
  if not preset.fused_probe_step:
    memory["probe step"] = compiled_memory(directions, a_state, a_batch)
  programs = trajectory._programs(fake, kind, preset, layout.mesh)
  k, width = len(programs.names), programs.width
  a_params = layout.params(params)
  stacked = layout.stacked(params, k)
  rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), measurements.make_rows(
      width, len(jax.tree.leaves(params))))
  memory["first-order term"] = compiled_memory(programs.first_order, a_params, stacked, a_probe)
  memory["second derivatives"] = compiled_memory(programs.second_derivatives, a_params, stacked,
                                                 a_params, rows, a_probe)
  memory["landscape"] = compiled_memory(programs.landscape, a_params, stacked, a_probe)
  memory["attribution"] = compiled_memory(programs.attribution, a_params, a_params, a_params,
                                          a_probe)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  if preset.lanczos_iterations:
    memory["λ_max (Lanczos)"] = compiled_memory(programs.top_eigenvalue, a_params, a_probe,
                                                key)
    memory["λ_max(P⁻¹H) (Lanczos)"] = compiled_memory(
        programs.preconditioned_top_eigenvalue, a_params, a_params, a_probe, key)
  if preset.block_spectrum_steps:
    memory["block spectra (SLQ)"] = compiled_memory(programs.block_spectra, a_params, a_probe,
                                                    key)
  resident = {"parameters": tree_bytes(params), "directions": k * tree_bytes(params),
              "Adam's preconditioner": tree_bytes(params),
              "gradient and SGD's direction": 2 * tree_bytes(params),
              "probe batch": tree_bytes(probe_batch) + tree_bytes(model_state or {}),
              "optimizer states": tree_bytes(state.opt_state)}
  resident = {key: value / layout.devices for key, value in resident.items()}
  return {"memory": memory, "resident": resident, "params": params, "model": model,
          "batch": batch, "probe_batch": probe_batch, "state": state, "width": width,
          "names": list(programs.names)}


def _phases(found: dict, usable: float | None) -> dict:
  """Peak bytes per device of training, of computing the directions and of the probe
  programs; whether the optimizer states must be set aside during a probe point."""
  memory, resident = found["memory"], found["resident"]
  train = memory["train step"].peak
  directions = memory.get("probe step", memory["train step"]).peak
  if "probe step" not in memory:  # fused: a step on a copy of the state
    directions += memory["train step"].arguments
  probing = sum(v for key, v in resident.items() if key != "optimizer states")
  programs = max(m.working for key, m in memory.items() if key not in ("train step",
                                                                       "probe step"))
  with_states = probing + resident["optimizer states"] + programs
  set_aside = usable is not None and with_states > usable
  probe = probing + programs + (0 if set_aside else resident["optimizer states"])
  return {"training": train, "directions": directions, "probe point": probe,
          "set aside": set_aside, "peak": max(train, directions, probe)}


def plan_trajectories(name, preset, layout: Layout, kind, epochs, probe_points,
                      usable=None) -> dict:
  """A trajectory experiment of one task: ``epochs`` over all its trajectories,
  ``probe_points`` in all."""
  found = _trajectory_programs(name, preset, layout, kind)
  params, model = found["params"], found["model"]
  loss = loop.model_loss(model, layout.mesh)
  a_params, a_batch = layout.params(params), layout.batch(found["batch"])
  a_probe = layout.batch(found["probe_batch"])
  if models.make_state_loss_fn(model) is not None:  # evaluation mode reads the statistics
    loss = loop.model_loss(model, layout.mesh, mode="eval")
    a_probe = {**a_probe, "model_state": layout.params(found["state"].model_state)}
  # FLOPs from loop-free programs (the cost analysis counts a loop body once).
  step_flops = _flops(jax.jit(jax.value_and_grad(loop.model_loss(model, layout.mesh))),
                      a_params, a_batch)
  per_forward = _flops(jax.jit(loss), a_params, a_probe)
  per_gradient = _flops(jax.jit(jax.value_and_grad(loss)), a_params, a_probe)
  per_direction = _flops(jax.jit(lambda p, u, b: jax.jvp(lambda x: jax.jvp(
      lambda y: loss(y, b), (x,), (u,))[1], (p,), (u,))[1]), a_params, a_params, a_probe)
  hvp = 2 * per_direction  # forward-over-reverse ≈ two forward-over-forward in cost
  diagonal = sum(min(preset.curvature_samples, x.size) for x in jax.tree.leaves(params))
  share = 1.0 if preset.curvature_at == "every" else 1 / max(1, len(preset.probe_epochs))
  blocks = len(set(jax.tree.leaves(block_partition.partition(params))))
  shape = measurements.Shape(
      directions=len(found["names"]), width=found["width"], steps=len(preset.landscape_steps),
      lanczos_iterations=preset.lanczos_iterations,
      diagonal_calls=math.ceil(diagonal / found["width"]) * share,
      blocks=blocks,
      block_directions=len(measurements.block_directions(found["names"], preset)),
      # the block spectra run at a unit's first probe point only
      block_spectrum_matvecs=(blocks * preset.block_spectrum_samples
                              * preset.block_spectrum_steps / max(1, len(preset.probe_epochs))))
  cost = measurements.point_cost(shape, preset)
  probe_flops = (cost.forwards * per_forward + cost.gradients * per_gradient
                 + cost.second_derivatives * per_direction + cost.hessian_vector_products * hvp
                 + step_flops)
  task = getattr(preset, name)
  return {"parameters": _count(params), "memory": found["memory"],
          "resident": found["resident"], "phases": _phases(found, usable),
          "state_bytes": tree_bytes(found["state"].opt_state) / layout.devices,
          "step_flops": step_flops, "probe_flops": probe_flops,
          "steps": epochs * (task.train_size // task.batch_size), "probe_points": probe_points,
          "microbatch_size": task.microbatch_size}


def plan_training(name, preset, layout: Layout, runs, epochs, usable=None) -> dict:
  """Plain training runs of one task: the convergence sweep's vmapped step (the copies of
  one compiled call) or the smoothness step and its Gauss-Newton measurement."""
  task = getattr(preset, name)
  model, batch = model_and_batch(name, preset)
  params = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
  memory = {}
  if name == "classification":
    step, measure = smoothness._compiled(model, task.microbatch_size, task.remat, layout.mesh)
    tx = smoothness.TRAINING.make(1.0, tunable=True)
    state = jax.eval_shape(lambda p: loop.TrainState(p, tx.init(p)), params)
    memory["train step"] = compiled_memory(
        step, loop.TrainState(layout.params(state.params), layout.params(state.opt_state)),
        layout.batch(batch))
    _, probe = model_and_batch(name, preset, task.test_size)
    for subset in smoothness.SUBSETS:
      memory[f"Gauss-Newton ({subset})"] = compiled_memory(
          jax.jit(lambda p, b, s=subset: measure(p, b, s)), layout.params(params),
          layout.batch(probe))
    state_bytes = tree_bytes(state.opt_state)
  else:
    copies = preset.convergence_copies
    variant = Variant("adam", clip=0.5)  # the costliest member: two moments and a search
    init, step, _ = convergence._compiled(model, variant, task.microbatch_size, task.remat,
                                          layout.mesh)
    rates = jax.ShapeDtypeStruct((copies,), jnp.float32)
    stacked_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((copies,) + x.shape, x.dtype),
                                  params)
    states = jax.eval_shape(init, stacked_params, rates)
    size = preset.convergence_batch_size or task.batch_size
    _, one = model_and_batch(name, preset, size)
    batches = jax.tree.map(lambda x: jax.ShapeDtypeStruct((copies,) + x.shape, x.dtype), one)
    memory["sweep step"] = compiled_memory(step, states, batches)
    state_bytes = tree_bytes(states)
  peak = max(m.peak for m in memory.values())
  return {"parameters": _count(params), "memory": memory, "resident": {},
          "phases": {"training": peak, "directions": 0, "probe point": 0, "set aside": False,
                     "peak": peak},
          "state_bytes": state_bytes / layout.devices,
          "step_flops": _flops(jax.jit(jax.value_and_grad(loop.model_loss(model, layout.mesh))),
                               layout.params(params), layout.batch(batch)),
          "probe_flops": 0.0, "steps": runs * epochs * (task.train_size // task.batch_size),
          "probe_points": 0, "microbatch_size": task.microbatch_size}


def _convergence_runs(preset, name) -> int:
  # Per pair member: the coarse scan, the fine scan on every tuning seed, the evaluation at
  # its own and at its partner's rate (a moved fine window adds one more scan).
  members = 2 * len(convergence.PAIRS[name])
  return members * (preset.convergence_coarse_points
                    + (2 * convergence.FINE_HALF_WIDTH + 1) * len(preset.convergence_tuning_seeds)
                    + 2 * len(preset.convergence_seeds))


TASKS = ("translation", "code", "classification", "images")


def plan(preset, seeds: int, mesh=None, usable=None, tasks=TASKS) -> list:
  """[(experiment, task, figures)] for every experiment of ``reproduce`` on ``tasks``."""
  layout = Layout(mesh)
  rows = []
  points = lambda epochs: seeds * len(epochs)
  started = time.time()

  def planned(experiment, name, found):
    # Compiling the paper's programs takes minutes on a CPU: say where, and what was found
    # (so that an interrupted plan still has its rows).
    phases = found["phases"]
    print(f"  planned {experiment.split(' ')[0]}/{name} ({time.time() - started:.0f} s): "
          f"peak {phases['peak'] / GIB:.2f} GiB/device (training {phases['training'] / GIB:.2f}"
          f", directions {phases['directions'] / GIB:.2f}, probe point "
          f"{phases['probe point'] / GIB:.2f}"
          + (", optimizer states set aside" if phases["set aside"] else "") + ")",
          file=sys.stderr, flush=True)
    rows.append((experiment, name, found))

  for name in ("translation", "code"):
    if name in tasks:
      planned("sharpness (Tables 1, 4-7, every probe section)", name, plan_trajectories(
          name, preset, layout, "transformer", seeds * 2 * preset.epochs,
          2 * points(preset.probe_epochs), usable))
  for name in ("translation", "code"):
    if name in tasks:
      planned("convergence (Figure 6)", name, plan_training(
          name, preset, layout, _convergence_runs(preset, name), preset.convergence_epochs,
          usable))
  if "classification" in tasks:
    planned("smoothness (Table 8)", "classification", plan_training(
        "classification", preset, layout, seeds, preset.smoothness_epochs, usable))
  if "images" in tasks:
    planned("resnet (Table 9)", "images", plan_trajectories(
        "images", preset, layout, "resnet", seeds * preset.resnet_epochs,
        points(preset.resnet_probe_epochs), usable))
  return rows


def largest_microbatch(preset, name: str, kind: str, usable: float, mesh=None) -> tuple:
  """(the largest micro-batch size that divides the task's batch and test batch and whose
  peak fits ``usable`` bytes, its peak) — a line through the peaks at the preset's size and
  half of it, the chosen size compiled to check; (None, peak) if none fits."""
  task = getattr(preset, name)
  layout = Layout(mesh)
  sizes = [d for d in divisors(task.batch_size) if task.test_size % d == 0]

  def peak(size):
    sized = dataclasses.replace(preset, **{name: dataclasses.replace(task,
                                                                     microbatch_size=size)})
    if kind == "training":
      return plan_training(name, sized, layout, 1, 1)["phases"]["peak"]
    return _phases(_trajectory_programs(name, sized, layout, kind), usable)["peak"]

  base = task.microbatch_size or task.batch_size
  half = max([s for s in sizes if s <= base // 2] or [min(sizes)])
  if half == base:
    return (base, peak(base)) if peak(base) <= usable else (None, peak(base))
  high, low = peak(base), peak(half)
  slope = (high - low) / (base - half)
  fitting = [s for s in sizes if low + slope * (s - half) <= usable]
  for size in sorted(fitting, reverse=True):
    measured = peak(size)
    if measured <= usable:
      return size, measured
  return None, low


def table(rows, peak_tflops: float, utilization: float, devices: int,
          device_names=()) -> str:
  gib = lambda b: f"{b / GIB:.3g}"
  lines = ["| experiment | task | parameters | micro-batch | state GiB/dev | training GiB/dev "
           "| directions GiB/dev | probe point GiB/dev | peak GiB/dev | TFLOP/step "
           "| TFLOP/probe point | steps | probe points | total PFLOP | hours |"
           + "".join(f" fits {d} |" for d in device_names),
           "|" + "---|" * (15 + len(device_names))]
  total_seconds = 0.0
  for experiment, task, r in rows:
    flops = r["steps"] * r["step_flops"] + r["probe_points"] * r["probe_flops"]
    seconds = flops / (peak_tflops * 1e12 * utilization * devices)
    total_seconds += seconds
    phases = r["phases"]
    fits = "".join(f" {'yes' if phases['peak'] <= usable_bytes(d) else 'NO'} |"
                   for d in device_names)
    lines.append(
        f"| {experiment} | {task} | {r['parameters'] / 1e6:.3g}M | "
        f"{r['microbatch_size'] or 'whole batch'} | {gib(r['state_bytes'])} | "
        f"{gib(phases['training'])} | {gib(phases['directions'])} | "
        f"{gib(phases['probe point'])}{' (states set aside)' if phases['set aside'] else ''} | "
        f"{gib(phases['peak'])} | {r['step_flops'] / 1e12:.3g} | "
        f"{r['probe_flops'] / 1e12:.3g} | {r['steps']} | {r['probe_points']} | "
        f"{flops / 1e15:.3g} | {seconds / 3600:.3g} |{fits}")
    r["peak_gib"] = phases["peak"] / GIB
  lines.append(f"\nTotal: {total_seconds / 3600:.1f} h at {peak_tflops:g} TFLOP/s × "
               f"{utilization:.0%} utilisation × {devices} device(s). Peak per-device memory: "
               + ", ".join(f"{e.split(' ')[0]}/{t} {r['peak_gib']:.1f} GiB" for e, t, r in rows))
  return "\n".join(lines)


def programs_table(rows) -> str:
  """Every compiled program's memory per device: arguments, outputs, temporaries, aliased."""
  gib = lambda b: f"{b / GIB:.3g}"
  lines = ["| experiment | task | program | arguments | outputs | temporaries | aliased | "
           "peak GiB/dev |", "|" + "---|" * 8]
  for experiment, task, r in rows:
    for name, m in r["memory"].items():
      lines.append(f"| {experiment.split(' ')[0]} | {task} | {name} | {gib(m.arguments)} | "
                   f"{gib(m.outputs)} | {gib(m.temporaries)} | {gib(m.aliased)} | "
                   f"{gib(m.peak)} |")
  return "\n".join(lines)
