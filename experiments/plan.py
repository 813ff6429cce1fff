"""``python -m experiments plan``: what a preset costs, before running any step.

Per experiment and task: parameters; per-device bytes of the parameters, of the training
state and of the probe optimizers' states in it; the temporaries of the compiled train step
and probe programs (XLA's memory analysis of the real programs at full size, compiled from
abstract inputs made with `jax.eval_shape`); FLOPs per train step and per probe point
(XLA's cost analysis); the run's steps and FLOPs; and the wall time at ``--peak-tflops``
and an assumed utilisation.

How it is measured, as stated in the output: the train step is compiled with the trajectory's
own optimizer; the probe optimizers that ride along (elementwise updates fused into the
step) are counted from their exact state shapes (`jax.eval_shape`), their stacked updates
beside the probe programs' temporaries, and their arithmetic and threshold searches
analytically (~20 and ~70
FLOPs per coordinate) — compiling the step with all of them takes minutes per model on a
CPU. The probe programs are compiled as they are. XLA's cost analysis counts a loop body
once, so FLOPs come from loop-free programs (one forward, one direction's second
derivative) times the known trip counts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import optclip.models as models
from experiments.probing import measurements, probes
from experiments.sections import convergence
from experiments.training import loop as training
from experiments.training.loop import tree_bytes
from experiments.training.variants import Variant
from optclip import blocks as block_partition

# Per coordinate and pass: 8 compares, 2 selects, the extremes; ~6 passes plus the summary
# and the statistics pass.
SEARCH_FLOPS_PER_COORDINATE = 70
# A probe optimizer's elementwise update (moments, bias corrections, the division).
UPDATE_FLOPS_PER_COORDINATE = 20


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _abstract(tree, mesh, spec_of):
  """ShapeDtypeStructs of ``tree``, with shardings on ``mesh`` where given."""
  if mesh is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  from jax.sharding import NamedSharding
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, spec_of(x.shape))), tree)


def model_and_batch(name: str, preset):
  """The task's model at full size and an abstract batch of the preset's shapes."""
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
  b, length = task.batch_size, task.max_length
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


def _flops(jitted, *args) -> float:
  return float((jitted.lower(*args).cost_analysis() or {}).get("flops", 0.0))


def analyse(jitted, *args):
  """(temporary bytes per device, FLOPs of one call) of the compiled program."""
  lowered = jitted.lower(*args)
  flops = (lowered.cost_analysis() or {}).get("flops", 0.0)
  memory = lowered.compile().memory_analysis()
  return int(getattr(memory, "temp_size_in_bytes", 0)), float(flops)


# The step the planner compiles: Adam's (the costlier trajectory).
TRAJECTORY_OPTIMIZER = Variant("adam")


def _abstract_batch(batch, mesh, spec_of):
  if mesh is None:
    return _abstract(batch, None, None)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec_of(x.shape, True))),
      batch)


def _clipped_searches(kind: str) -> int:
  return sum(v.clip is not None or v.clip_update is not None for v in probes.PROBES[kind])


def plan_trajectories(name, preset, mesh, spec_of, kind, epochs, probe_points) -> dict:
  """A trajectory experiment of one task: ``epochs`` over all its trajectories,
  ``probe_points`` in all."""
  model, batch = model_and_batch(name, preset)
  params = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
  loss = training.model_loss(model, mesh)
  real = probes.train_transform("sgd", 1.0, kind)
  state = jax.eval_shape(lambda p: training.TrainState(p, real.init(p)), params)
  probe_bytes = tree_bytes(state.opt_state.probes)
  alone = TRAJECTORY_OPTIMIZER.make(1.0, tunable=True)
  alone_state = jax.eval_shape(lambda p: training.TrainState(p, alone.init(p)), params)
  a_params = _abstract(params, mesh, spec_of)
  a_batch = _abstract_batch(batch, mesh, spec_of)
  step_temp, step_flops = analyse(training.train_step(loss, alone),
                                  _abstract(alone_state, mesh, spec_of), a_batch)
  n = _count(params)
  directions = len(probes.PROBES[kind])
  step_flops += n * (directions * UPDATE_FLOPS_PER_COORDINATE
                     + _clipped_searches(kind) * SEARCH_FLOPS_PER_COORDINATE)
  programs = measurements.make_programs(loss, [v.label for v in probes.PROBES[kind]],
                                      tuple(preset.landscape_steps), preset.lanczos_iterations)
  width = programs.width
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((width,) + x.shape, x.dtype),
                         params)
  if mesh is not None:  # the directions' leading axis is not split
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            None, *spec_of(x.shape[1:]))))), stacked)
  shifts = jax.ShapeDtypeStruct((width,), jnp.float32)
  second_temp, _ = analyse(programs.second_derivatives, a_params, stacked, shifts, a_batch)
  landscape_temp, _ = analyse(programs.landscape, a_params, stacked, a_batch)
  # FLOPs of one forward and of one direction's second derivative, from programs without
  # loops (the cost analysis counts a loop body once).
  per_forward = _flops(jax.jit(loss), a_params, a_batch)
  per_direction = _flops(jax.jit(lambda p, u, b: jax.jvp(lambda x: jax.jvp(
      lambda y: loss(y, b), (x,), (u,))[1], (p,), (u,))[1]), a_params, a_params, a_batch)
  per_gradient = _flops(jax.jit(jax.value_and_grad(loss)), a_params, a_batch)
  hvp = 2 * per_direction  # forward-over-reverse ≈ two forward-over-forward in cost
  # Per point, the measurements' declared costs (experiments.probing.measurements), with the
  # diagonal entries of the last point spread over all points where only the last takes them.
  diagonal = sum(min(preset.curvature_samples, x.size) for x in jax.tree.leaves(params))
  share = 1.0 if preset.curvature_at == "every" else 1 / max(1, len(preset.probe_epochs))
  shape = measurements.Shape(
      directions=directions, width=width, steps=len(preset.landscape_steps),
      lanczos_iterations=preset.lanczos_iterations,
      diagonal_calls=math.ceil(diagonal / width) * share,
      blocks=len(set(jax.tree.leaves(block_partition.partition(params)))))
  cost = measurements.point_cost(shape, preset)
  probe_flops = (cost.forwards * per_forward + cost.gradients * per_gradient
                 + cost.second_derivatives * per_direction + cost.hessian_vector_products * hvp
                 + step_flops)
  lanczos_bytes = preset.lanczos_iterations * tree_bytes(params)
  devices = 1 if mesh is None else mesh.size
  return {"parameters": n, "params_bytes": tree_bytes(params) / devices,
          "state_bytes": (tree_bytes(state) - tree_bytes(params)) / devices,
          "probe_state_bytes": probe_bytes / devices,
          "step_temp": step_temp,
          # the probe programs' temporaries, beside the stacked directions they read
          "probe_temp": (max(second_temp, landscape_temp) + lanczos_bytes / devices
                         + directions * tree_bytes(params) / devices),
          "step_flops": step_flops, "probe_flops": probe_flops,
          "steps": epochs * (getattr(preset, name).train_size // getattr(preset, name).batch_size),
          "probe_points": probe_points}


def plan_training(name, preset, mesh, spec_of, runs, epochs) -> dict:
  """Plain training runs of one task (convergence, smoothness): an Adam step."""
  model, batch = model_and_batch(name, preset)
  params = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
  tx = TRAJECTORY_OPTIMIZER.make(1.0, tunable=True)
  state = jax.eval_shape(lambda p: training.TrainState(p, tx.init(p)), params)
  a_batch = _abstract_batch(batch, mesh, spec_of)
  temp, flops = analyse(training.train_step(training.model_loss(model, mesh), tx),
                        _abstract(state, mesh, spec_of), a_batch)
  task = getattr(preset, name)
  devices = 1 if mesh is None else mesh.size
  return {"parameters": _count(params), "params_bytes": tree_bytes(params) / devices,
          "state_bytes": (tree_bytes(state) - tree_bytes(params)) / devices,
          "probe_state_bytes": 0, "step_temp": temp, "probe_temp": 0, "step_flops": flops,
          "probe_flops": 0, "steps": runs * epochs * (task.train_size // task.batch_size),
          "probe_points": 0}


def plan(preset, seeds: int, mesh=None) -> list:
  """[(experiment, task, figures)] for every experiment of ``reproduce``."""
  from optclip import sharding

  def spec_of(shape, batch_axis=False):
    if mesh is None:
      return None
    if batch_axis:
      split = mesh.shape.get("data", 1)
      return sharding.batch_spec(len(shape)) if shape and shape[0] % split == 0 else \
          jax.sharding.PartitionSpec()
    return sharding.fsdp_spec(shape, mesh)

  rows = []
  points = lambda epochs: seeds * len(epochs)
  for name in ("translation", "code"):
    rows.append(("sharpness (Tables 1, 4-7, every probe section)", name, plan_trajectories(
        name, preset, mesh, spec_of, "transformer", seeds * 2 * preset.epochs,
        2 * points(preset.probe_epochs))))
  for name in ("translation", "code"):
    # Per pair member: the coarse scan, the fine scan on every tuning seed, the evaluation
    # at its own and at its partner's rate (a moved fine window adds one more scan).
    members = 2 * len(convergence.PAIRS[name])
    runs = members * (preset.convergence_coarse_points
                      + (2 * convergence.FINE_HALF_WIDTH + 1)
                      * len(preset.convergence_tuning_seeds) + 2 * len(preset.convergence_seeds))
    rows.append(("convergence (Figure 6)", name,
                 plan_training(name, preset, mesh, spec_of, runs, preset.convergence_epochs)))
  rows.append(("smoothness (Table 8)", "classification",
               plan_training("classification", preset, mesh, spec_of, seeds,
                             preset.smoothness_epochs)))
  rows.append(("resnet (Table 9)", "images", plan_trajectories(
      "images", preset, mesh, spec_of, "resnet", seeds * preset.resnet_epochs,
      points(preset.resnet_probe_epochs))))
  return rows


def table(rows, peak_tflops: float, utilization: float, devices: int) -> str:
  gib = lambda b: f"{b / 2**30:.3g}"
  lines = ["| experiment | task | parameters | params GiB/dev | state GiB/dev (of it probes) "
           "| step temp GiB/dev | probe temp GiB/dev | TFLOP/step | TFLOP/probe point "
           "| steps | probe points | total PFLOP | hours |", "|" + "---|" * 13]
  total_seconds = 0.0
  for experiment, task, r in rows:
    flops = r["steps"] * r["step_flops"] + r["probe_points"] * r["probe_flops"]
    seconds = flops / (peak_tflops * 1e12 * utilization * devices)
    total_seconds += seconds
    memory = r["params_bytes"] + r["state_bytes"] + max(r["step_temp"], r["probe_temp"])
    lines.append(f"| {experiment} | {task} | {r['parameters'] / 1e6:.3g}M | "
                 f"{gib(r['params_bytes'])} | {gib(r['state_bytes'])} "
                 f"({gib(r['probe_state_bytes'])}) | {gib(r['step_temp'])} | "
                 f"{gib(r['probe_temp'])} | {r['step_flops'] / 1e12:.3g} | "
                 f"{r['probe_flops'] / 1e12:.3g} | {r['steps']} | {r['probe_points']} | "
                 f"{flops / 1e15:.3g} | {seconds / 3600:.3g} |")
    r["peak_gib"] = memory / 2**30
  lines.append(f"\nTotal: {total_seconds / 3600:.1f} h at {peak_tflops:g} TFLOP/s × "
               f"{utilization:.0%} utilisation × {devices} device(s). Peak per-device memory "
               "(parameters + state + the larger temporaries): "
               + ", ".join(f"{e.split(' ')[0]}/{t} {r['peak_gib']:.1f} GiB" for e, t, r in rows))
  return "\n".join(lines)
