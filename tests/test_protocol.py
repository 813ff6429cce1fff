"""The experiment protocol against the paper (issue: fidelity): the probe batch, raw
sharpness in the tables, R_med from exact diagonal entries, Theorem 2's check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import presets, tasks
from experiments.probing import measurements, probes, trajectory
from experiments.sections import rmed, sharpness, theory
from optclip import blocks


def _rows(data):
  """Every example of a batch dict as one hashable tuple of all its fields."""
  return [tuple(np.concatenate([np.ravel(field) for field in row]).tolist())
          for row in zip(*data.values())]


# One task in the default suite (13 s); the other three (20-29 s each) are slow.
@pytest.mark.parametrize("name", [
    pytest.param("translation", marks=pytest.mark.slow),
    pytest.param("code", marks=pytest.mark.slow), "classification",
    pytest.param("images", marks=pytest.mark.slow)])
def test_probe_batch_is_a_subset_of_the_training_subset(name, tmp_path):
  """Appendix B.3: the probe ("test") batch is a fixed random subset of the training data;
  every probe-batch example is one of the training examples, and it is recorded."""
  preset = presets.PRESETS["smoke"]
  task = tasks.build(name, preset, 0, cache_dir=str(tmp_path))
  train, probe = set(_rows(task.train)), _rows(task.test_batch)
  assert probe and all(row in train for row in probe)
  assert task.info["probe_batch"]["source"].startswith("a fixed random subset")
  assert len(task.info["probe_batch"]["indices_sha256"]) == 16
  # The held-out reading is available and is disjoint from the training subset.
  import dataclasses
  held_out = tasks.build(name, dataclasses.replace(preset, probe_batch="held-out"), 0,
                         cache_dir=str(tmp_path))
  outside = _rows(held_out.test_batch)
  assert held_out.info["probe_batch"]["source"].startswith("held-out")
  assert sum(row in train for row in outside) < len(outside)


def _probe_record(task, traj, seed, epoch, sharp):
  labels = [v.label for v in probes.PROBES["transformer"]]
  values = np.linspace(0.5, 1.5, len(labels))
  for name, value in sharp.items():
    values[labels.index(name)] = value
  return {"experiment": "trajectory", "key": f"transformer-{task}-{traj}-seed{seed}/epoch"
          f"{epoch}/probe", "kind": "transformer", "task": task, "trajectory": traj,
          "seed": seed, "epoch": epoch, "algorithms": labels, "sharpness": list(values),
          "sharpness_robust": list(np.abs(values) + 1.0), "shifted": list(values < 0)}


def test_raw_negative_sharpness_survives_into_the_tables(tmp_path):
  """Negative raw values appear as negative ratios (not replaced by Eq. 4's value), counted;
  a negative SGD value is the one place the shifted value enters, marked."""
  (tmp_path / "tables").mkdir()
  records = [_probe_record("translation", "sgd", 0, 2, {"sgd": 2.0, "adam": -0.5}),
             _probe_record("translation", "sgd", 1, 2, {"sgd": -1.0, "adam": 0.25})]
  text, _ = sharpness.write(str(tmp_path), records)
  table = (tmp_path / "tables" / "sharpness_translation_sgd.md").read_text()
  adam = next(line for line in table.splitlines() if "| adam |" in line)
  assert "-0.25" in adam  # -0.5 / 2.0, raw
  # seed 1: SGD raw is -1, so its Eq. 4 value |−1| + 1 = 2 is the denominator, marked.
  assert "0.125‡" in adam
  assert "Negative entries: ours 1 of 24" in text


def _mlp():
  rng = np.random.default_rng(3)
  params = {"w1": jnp.asarray(rng.standard_normal((4, 5)) * 0.5, jnp.float32),
            "b1": jnp.asarray(rng.standard_normal(5) * 0.1, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((5, 3)) * 0.5, jnp.float32)}
  batch = {"x": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, 16))}

  def loss(p, b):
    logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), b["y"]])
  return loss, params, batch


def test_r_med_equals_the_dense_hessian_diagonal_when_every_coordinate_is_sampled():
  loss, params, batch = _mlp()
  programs = measurements.make_programs(loss, ["a", "b"], (0.0, 0.1), 4)
  sample = trajectory.curvature_sample(params, 1000, seed=0)  # more than any leaf: all
  point = measurements.Point(programs, dict(params=params, probe_batch=batch, sample=sample,
                                            diagonal_here=True, test_grads=params,
                                            sgd_update=params,
                                            directions=jax.tree.map(lambda x: x[None], params)),
                             None)
  measured = measurements.BY_NAME["hessian_diagonal"].run(point)["curvature_sample"]
  entries = np.concatenate(list(measured["hessian_diagonal"].values()))
  flat, unravel = ravel_pytree(params)
  dense = np.diag(np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat), np.float64))
  dense_tree = unravel(jnp.asarray(dense))
  bounds = np.cumsum([0] + [len(i) for i in sample.values()])
  record = {"hessian_diagonal": {}, "leaf_shapes": {}}
  for (name, index), leaf, a, b in zip(sample.items(), jax.tree.leaves(dense_tree),
                                       bounds[:-1], bounds[1:]):
    np.testing.assert_allclose(entries[a:b], np.asarray(leaf).ravel()[index], rtol=1e-4,
                               atol=1e-7)
    record["hessian_diagonal"][name] = list(entries[a:b])
    record["leaf_shapes"][name] = list(np.shape(leaf))
  overall, layers = rmed.sample_r_med(record)
  for name, leaf in zip(sample, jax.tree.leaves(dense_tree)):
    values = np.abs(np.asarray(leaf, np.float64).ravel())
    if np.ndim(leaf) >= 2:  # per layer: max / upper median, as optclip.curvature.r_med
      want = values.max() / np.sort(values)[::-1][int(np.ceil(len(values) / 2)) - 1]
      np.testing.assert_allclose(layers[name], want, rtol=1e-3)
  everything = np.abs(dense)
  want = everything.max() / np.sort(everything)[::-1][int(np.ceil(len(everything) / 2)) - 1]
  np.testing.assert_allclose(overall, want, rtol=1e-3)
  assert "['b1']" not in layers  # a vector is not a layer


def test_attribution_of_sgds_direction_equals_the_dense_hessians_quadratic_forms():
  """The probe point's attribution (its modified directions formed inside the second-
  derivative program, never stacked) against NumPy on the dense Hessian: for every fraction
  f, u without its top-f coordinates by |u| and by |g|, and u clipped at its top-f threshold
  (k = ceil(f·n), ties counted as top)."""
  loss, params, batch = _mlp()
  names = ["adam", "sgd"]
  rng = np.random.default_rng(11)
  flat, unravel = ravel_pytree(params)
  n = flat.size
  dense = np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat), np.float64)
  vectors = rng.standard_normal((2, n)).astype(np.float32)
  gradient = rng.standard_normal(n).astype(np.float32)
  directions = jax.tree.map(lambda *d: jnp.stack(d), *[unravel(jnp.asarray(v)) for v in vectors])
  programs = measurements.make_programs(loss, names, (0.0, 0.1), 4)
  point = measurements.Point(programs, dict(
      params=params, probe_batch=batch, names=names, directions=directions,
      sgd_update=unravel(jnp.asarray(vectors[1])), test_grads=unravel(jnp.asarray(gradient))),
                             None)
  got = measurements.BY_NAME["attribution"].run(point)["attribution"]
  u = vectors[1].astype(np.float64)
  quadratic = lambda v: v @ dense @ v / (v @ v)
  tau_of = lambda x, f: np.sort(np.abs(x))[::-1][int(np.ceil(f * n)) - 1]
  np.testing.assert_allclose(got["sharpness"], quadratic(u), rtol=1e-4)
  for i, f in enumerate(measurements.ATTRIBUTION_FRACTIONS):
    tau, tau_g = tau_of(u, f), tau_of(gradient, f)
    top, top_g = np.abs(u) >= tau, np.abs(gradient) >= tau_g
    np.testing.assert_allclose(got["share"][i], (u * (dense @ u))[top].sum() / (u @ dense @ u),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["norm_share_by_gradient"][i], (u[top_g] ** 2).sum() / (u @ u),
                               rtol=1e-5)
    for field, v in (("sharpness_without", np.where(top, 0, u)),
                     ("sharpness_clipped", np.clip(u, -tau, tau)),
                     ("sharpness_without_by_gradient", np.where(top_g, 0, u))):
      np.testing.assert_allclose(got[field][i], quadratic(v), rtol=1e-4, atol=1e-6,
                                 err_msg=f"{field} at {f}")


def test_first_order_terms_and_histograms_equal_numpys():
  """The probe point's loss, gradient, Eq. 1's first-order terms of every direction and the
  log10 |u| histograms of the named ones, against NumPy on the flat vectors."""
  loss, params, batch = _mlp()
  names = ["sgd", "b", "adam"]
  rng = np.random.default_rng(13)
  flat, unravel = ravel_pytree(params)
  vectors = (rng.standard_normal((3, flat.size)) * 10.0 ** rng.uniform(
      -12, -1, (3, flat.size))).astype(np.float32)
  vectors[0, :4] = 0  # exact zeros are counted apart
  directions = jax.tree.map(lambda *d: jnp.stack(d), *[unravel(jnp.asarray(v)) for v in vectors])
  programs = measurements.make_programs(loss, names, (0.0, 0.1), 4)
  point = measurements.Point(programs, dict(params=params, probe_batch=batch, names=names,
                                            directions=directions), None)
  got = measurements.BY_NAME["first_order"].run(point)
  gradient = np.asarray(ravel_pytree(jax.grad(loss)(params, batch))[0], np.float64)
  u = vectors.astype(np.float64)
  norm = np.linalg.norm(u, axis=1)
  np.testing.assert_allclose(got["loss"], float(loss(params, batch)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ravel_pytree(got["test_grads"])[0]), gradient,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["inner_product"], u @ gradient, rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(got["norm"], norm, rtol=1e-5)
  np.testing.assert_allclose(got["projection"], u @ gradient / norm, rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(got["cosine"], u @ gradient / norm / np.linalg.norm(gradient),
                             rtol=1e-4, atol=1e-12)
  low, high = measurements.HISTOGRAM_RANGE
  edges = np.linspace(low, high, measurements.HISTOGRAM_BINS + 1)
  assert sorted(got["histograms"]) == ["adam", "sgd"]
  for name, counts_and_zeros in got["histograms"].items():
    v = np.abs(vectors[names.index(name)])
    logs = np.clip(np.log10(v[v > 0]), low, high)  # outside the range: the end bins
    want, _ = np.histogram(logs, edges)
    np.testing.assert_array_equal(np.asarray(counts_and_zeros[0]), want, err_msg=name)
    assert int(counts_and_zeros[1]) == int((v == 0).sum())


def test_sharpness_and_its_shifted_values_equal_the_dense_hessians():
  """Raw uᵀHu/‖u‖² of every direction, and Eq. (4)'s value at x + δu/‖u‖ for the negative
  ones, against dense Hessians at both points."""
  loss, params, batch = _mlp()
  names = ["a", "b", "c"]
  rng = np.random.default_rng(12)
  flat, unravel = ravel_pytree(params)
  hessian = lambda x: np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(x), np.float64)
  dense = hessian(flat)
  # A direction along the most negative eigenvector: its raw sharpness is negative.
  values, vectors = np.linalg.eigh(dense)
  assert values[0] < 0
  directions_np = np.stack([vectors[:, 0], rng.standard_normal(flat.size),
                            rng.standard_normal(flat.size)]).astype(np.float32)
  directions = jax.tree.map(lambda *d: jnp.stack(d),
                            *[unravel(jnp.asarray(v)) for v in directions_np])
  norm_sq = (directions_np.astype(np.float64) ** 2).sum(axis=1)
  programs = measurements.make_programs(loss, names, (0.0, 0.1), 4)
  point = measurements.Point(programs, dict(params=params, probe_batch=batch, names=names,
                                            directions=directions, norm_sq=norm_sq,
                                            test_grads=params), None)
  got = measurements.BY_NAME["sharpness"].run(point)
  raw = np.einsum("ki,ij,kj->k", directions_np, dense, directions_np) / norm_sq
  np.testing.assert_allclose(got["sharpness"], raw, rtol=1e-4, atol=1e-6)
  assert got["shifted"].tolist() == (raw < 0).tolist() and got["shifted"][0]
  v = directions_np[0].astype(np.float64)
  moved = hessian(flat + jnp.asarray(measurements.ROBUST_DELTA * v / np.linalg.norm(v),
                                     jnp.float32))
  np.testing.assert_allclose(got["sharpness_robust"][0], v @ moved @ v / (v @ v), rtol=1e-4)
  np.testing.assert_allclose(got["sharpness_robust"][1:], raw[1:], rtol=1e-4, atol=1e-6)


def test_theorem2_holds_on_non_diagonal_instances_and_fails_when_violated():
  for epsilon in (0.01, 0.05):
    hessian, x0, bad = theory.instance(200, epsilon, seed=1)
    assert np.abs(hessian[np.ix_(bad, np.setdiff1d(np.arange(200), bad))]).max() > 1
    L, ell = theory.norms(hessian, bad)
    result = theory.theorem2(hessian, x0, bad, 5 * epsilon, L, ell)
    assert result["bound_holds"] and result["decrement_holds"]
    assert result["bound"] < L
  # A counter-case: every coordinate is sharp (H = L·I), so removing an ε-fraction leaves
  # norm L, not the ℓ = 1 claimed. With a uniform gradient (C₂ = 1) the bound
  # C₂(2√ε·L + ℓ) = 0.2L + 1 is far below the actual sharpness L: the check must say so.
  d, L = 100, 1000.0
  hessian, x0 = L * np.eye(d), np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
  result = theory.theorem2(hessian, x0, np.arange(1), 0.05, L, 1.0)
  assert result["C2"] == pytest.approx(1.0)
  assert not result["bound_holds"]
  assert result["clipped_sharpness"] == pytest.approx(L)
  # With the true ℓ (the hypothesis holds) the same instance satisfies the bound.
  assert theory.theorem2(hessian, x0, np.arange(1), 0.05, *theory.norms(hessian,
                                                                        np.arange(1)))["bound_holds"]


def test_scaling_ladder_grows_at_the_quick_presets_task_settings():
  """The scale trend's sizes have strictly more parameters, one after the other, once the
  task has set vocabulary and positions (as `tasks.build` does)."""
  import dataclasses
  from experiments.sections import scaling
  from experiments.plan import model_and_batch
  from optclip import models
  for task, sizes in scaling.SIZES.items():
    counts = []
    for name in sizes:
      preset = dataclasses.replace(presets.QUICK, **{task: dataclasses.replace(
          getattr(presets.QUICK, task), model=name)})
      model, _ = model_and_batch(task, preset)
      shapes = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.PRNGKey(0))
      counts.append(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)))
    assert all(a < b for a, b in zip(counts, counts[1:])), (task, sizes, counts)


def test_resnet_probes_use_batchnorm_running_statistics(tmp_path):
  """Table 9 as the paper's code measures it (``model.eval()``): the probe programs' loss is
  the evaluation-mode loss on the running statistics the training steps keep, not the
  training-mode loss on the batch's own statistics."""
  import optax
  from flax import linen as nn
  from experiments.training import loop
  import optclip.models as models
  preset = presets.SMOKE
  task = tasks.build("images", preset, 0, cache_dir=str(tmp_path))
  params, model_state = task.init_params(0), task.init_model_state(0)
  assert set(model_state) == {"batch_stats"}
  # A few training steps move the running statistics away from their start.
  tx = optax.sgd(0.05)
  step = loop.train_step(task.loss_fn, tx, loop.model_state_loss(task.model))
  state = loop.initial_state(tx, params, model_state=model_state)
  for batch in task.epoch_batches(0, 0):
    state, _ = step(state, batch)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.model_state,
                       model_state)
  assert max(jax.tree.leaves(moved)) > 0
  programs = trajectory._programs(task, "resnet", preset)
  probe_batch = trajectory.probe_batch(task.test_batch, state)
  k = len(programs.names)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * k), state.params)
  _, measured = programs.first_order(state.params, stacked, probe_batch)
  # Independently: Flax's apply in evaluation mode with the running averages.
  logits = task.model.apply({"params": state.params, **state.model_state},
                            task.test_batch["pixels"], train=False)
  expected = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]),
                                                  task.test_batch["label"]])
  np.testing.assert_allclose(float(measured["loss"]), float(expected), rtol=1e-5)
  train_mode = float(models.make_loss_fn(task.model)(state.params, task.test_batch))
  assert abs(train_mode - float(expected)) > 1e-4


def test_scale_trend_rule():
  """Toward the paper's value when every larger model is closer (log distance of the
  magnitude for ratios, linear for the share), away when every one is farther."""
  from experiments.sections import scaling
  assert scaling.trend([0.3, 0.1, 0.01], 0.003) == "toward"
  assert scaling.trend([0.016, 0.035, 0.091], 0.003) == "away"
  assert scaling.trend([0.1, 0.01, 0.05], 0.003) == "mixed"
  assert scaling.trend([-0.3, 0.1, -0.01], 0.003) == "toward"  # magnitudes
  assert scaling.trend([0.2, 0.3, 0.45], 0.5) == "toward"
  assert scaling.trend([0.45, 0.3, 0.2], 0.5) == "away"


@pytest.mark.parametrize("chosen", [(), ("b",)])
def test_block_split_equals_the_dense_hessians_blocks_for_every_chosen_direction(chosen):
  """u_bᵀHu_b/‖u‖² from the block split equals the dense Hessian's block quadratic forms,
  for every probe update when the preset names none, for the named ones otherwise."""
  import types
  rng = np.random.default_rng(5)
  params = {"wte": {"embedding": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)},
            "mlp": {"fc_in": {"kernel": jnp.asarray(rng.standard_normal((3, 4)) * 0.5,
                                                    jnp.float32)}},
            "ln_f": {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(4), jnp.float32)}}
  batch = {"ids": jnp.asarray(rng.integers(0, 6, 8)), "y": jnp.asarray(rng.integers(0, 4, 8))}

  def loss(p, b):
    h = jnp.tanh(p["wte"]["embedding"][b["ids"]] @ p["mlp"]["fc_in"]["kernel"])
    logits = h * p["ln_f"]["scale"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), b["y"]])

  names = ["a", "b", "c"]
  flat, unravel = ravel_pytree(params)
  dense = np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat), np.float64)
  vectors = rng.standard_normal((3, flat.size)).astype(np.float32)
  directions = jax.tree.map(lambda *d: jnp.stack(d), *[unravel(jnp.asarray(v)) for v in vectors])
  norm_sq = (vectors.astype(np.float64) ** 2).sum(axis=1)
  sharp = np.einsum("ki,ij,kj->k", vectors, dense, vectors) / norm_sq
  programs = measurements.make_programs(loss, names, (0.0, 0.1), 4)
  point = measurements.Point(programs, dict(params=params, probe_batch=batch, names=names,
                                            directions=directions, test_grads=params,
                                            norm_sq=norm_sq, sharpness=sharp),
                             types.SimpleNamespace(block_sharpness_directions=chosen))
  split = measurements.BY_NAME["block_sharpness"].run(point)["block_sharpness"]
  expected = list(chosen) or names
  assert split["directions"] == expected and sorted(split["blocks"]) == ["embedding", "mlp",
                                                                         "norm"]
  # which coordinates of the flat vector belong to which block (ravel_pytree's leaf order)
  owner = np.concatenate([np.full(leaf.size, label) for leaf, label in zip(
      jax.tree.leaves(params), jax.tree.leaves(blocks.partition(params)))])
  for row, name in zip(split["diagonal"], expected):
    u = vectors[names.index(name)].astype(np.float64)
    for value, block in zip(row, split["blocks"]):
      u_b = np.where(owner == block, u, 0.0)
      np.testing.assert_allclose(value, u_b @ dense @ u_b / (u @ u), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(
        split["cross_share"][expected.index(name)],
        1 - sum(row) / sharp[names.index(name)], rtol=1e-4, atol=1e-6)
