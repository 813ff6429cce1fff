"""Sharded vs unsharded results on 8 forced CPU devices (run by tests/test_sharding.py).

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded/check.py MESH...
Prints "OK <mesh>" per mesh; any mismatch raises.
"""

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from optclip import sharding


def params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"emb": (64, 32), "w1": (32, 128), "w2": (128, 32), "bias": (32,), "scale": ()}
  params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_t(2, s), jnp.float32) for k, s in shapes.items()}
  return params, grads


def loss_fn(params, batch):
  h = jax.nn.one_hot(batch, 64) @ params["emb"]  # a gather would need an out_sharding
  h = jnp.tanh(h @ params["w1"]) @ params["w2"] + params["bias"]
  return jnp.mean(jnp.square(h)) * (1 + params["scale"] ** 2)


def check(spec):
  mesh = sharding.mesh_from_spec(spec)
  params, grads = params_and_grads()
  batch = jnp.asarray(np.random.default_rng(1).integers(0, 64, (16, 8)))
  with jax.set_mesh(mesh):
    s_params = sharding.shard_params(params, mesh, min_size=256)
    s_grads = sharding.shard_params(grads, mesh, min_size=256)
    s_batch = sharding.shard_batch(batch, mesh)
    if mesh.shape["fsdp"] > 1:
      assert any(any(a is not None for a in jax.typeof(x).sharding.spec)
                 for x in jax.tree.leaves(s_grads)), "nothing was sharded"
    for fraction in (0.01, 0.1, 0.5, 1.0):
      want = optclip.clip_threshold(grads, fraction)
      got = jax.jit(optclip.clip_threshold, static_argnums=1)(s_grads, fraction)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for name, tx in [("adam", optclip.adam(1e-3, clip=0.5)),
                     ("sgd", optclip.sgd(1e-3, momentum=0.9, dampening=0.9, clip=0.1)),
                     ("normalized_sgd", optclip.normalized_sgd(1e-3, clip=0.1)),
                     ("signum", optclip.signum(1e-3, clip=0.1)),
                     ("lion", optclip.lion(1e-3, clip_update=0.5)),
                     ("adafactor", optclip.adafactor(None, clip=0.5)),
                     ("coord_clip", optax.chain(optclip.coord_clip(0.1), optax.sgd(1.0)))]:
      want, _ = jax.jit(tx.update)(grads, tx.init(params), params)
      got, _ = jax.jit(tx.update)(s_grads, tx.init(s_params), s_params)
      for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-9,
                                   err_msg=name)
    directions = jax.tree.map(lambda g: jnp.stack([g, -0.5 * g, g * g]), grads)
    s_directions = jax.tree.map(lambda g: jnp.stack([g, -0.5 * g, g * g]), s_grads)
    loss = lambda p: loss_fn(p, batch)
    # FSDP: weights are all-gathered where they are used; the batch stays split over "data".
    gather = lambda p: jax.tree.map(
        lambda x: jax.sharding.reshard(x, jax.sharding.PartitionSpec()), p)
    s_loss = lambda p: loss_fn(gather(p), s_batch)
    want = optclip.directional_sharpness(loss, params, directions)
    got = jax.jit(lambda p, d: optclip.directional_sharpness(s_loss, p, d))(s_params,
                                                                            s_directions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    steps = jnp.linspace(0, 0.1, 4)
    want = optclip.landscape(loss, params, directions, steps)
    got = jax.jit(lambda p, d: optclip.landscape(s_loss, p, d, steps))(s_params, s_directions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    tx = optclip.probes.with_pseudo_updates(
        optclip.sgd(0.1), {"sgd": optclip.sgd(0.1), "adam": optclip.adam(1e-3, clip=0.5)})

    def pseudo(g, p):
      state = tx.update(g, tx.init(p), p)[1]
      return optclip.probes.pseudo_updates(tx, state, g, p)

    want, got = jax.jit(pseudo)(grads, params), jax.jit(pseudo)(s_grads, s_params)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-9)
    check_search_path(grads, s_grads)
    check_microbatching(mesh)
    # Figure 1's histogram of sharded leaves (a reduction per bin) equals the unsharded one.
    want = jax.jit(optclip.geometry.coordinate_histogram)(grads)
    got = jax.jit(optclip.geometry.coordinate_histogram)(s_grads)
    for w, g in zip(want, got):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    check_convolution_and_embedding(mesh)
    check_checkpoint_onto_another_mesh(s_params, params, spec)
  print("OK", spec, flush=True)


def check_microbatching(mesh):
  """Micro-batches of a batch split over the mesh (each takes its examples from every
  device's own block) sum to the one-shot value and gradient, per-example outputs come back
  in the batch's order, and a size that is not a multiple of the devices is refused."""
  from optclip import microbatch
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.standard_normal((8, 16)).astype(np.float32))
  batch = {"x": jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32)),
           "m": jnp.asarray((rng.random(32) > 0.3).astype(np.float32))}
  gather = lambda p: (jax.sharding.reshard(p, jax.sharding.PartitionSpec())
                      if sharding.explicit_spec(p) is not None else p)
  loss_sum = lambda p, b: jnp.sum(b["m"][:, None] * jnp.tanh(b["x"] @ gather(p)) ** 2)
  count = lambda b: jnp.sum(b["m"])
  loss = lambda p, b: loss_sum(p, b) / count(b)
  one = lambda p, x, m: loss_sum(p, {"x": x[None], "m": m[None]})
  per_example = lambda p, b: jax.vmap(jax.grad(one), (None, 0, 0))(gather(p), b["x"], b["m"])
  want = jax.value_and_grad(loss)(w, batch)
  want_examples = per_example(w, batch)
  s_w = sharding.shard_params(w, mesh, min_size=0)
  s_batch = sharding.shard_batch(batch, mesh)
  objective = microbatch.Objective(loss, loss_sum, count, microbatch_size=16)
  got = jax.jit(objective.value_and_grad)(s_w, s_batch)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-7)
  examples = jax.jit(lambda p, b: microbatch.concatenated(
      lambda part: per_example(p, part), b, 16))(s_w, s_batch)
  np.testing.assert_allclose(np.asarray(examples), np.asarray(want_examples), rtol=1e-4,
                             atol=1e-6)
  try:
    microbatch.Objective(loss, loss_sum, count, microbatch_size=4).value(s_w, s_batch)
  except ValueError as error:
    assert "multiple of the 8 devices" in str(error), error
  else:
    raise AssertionError("a micro-batch of 4 over 8 devices was not refused")


def check_search_path(grads, s_grads):
  """The search is bit-exact sharded too: per_leaf, NaN/Inf."""
  bad = dict(grads, w1=grads["w1"].at[0, :3].set(jnp.asarray([jnp.nan, jnp.inf, -jnp.inf])))
  s_bad = dict(s_grads, w1=jax.device_put(bad["w1"], s_grads["w1"].sharding))
  for tree, s_tree in ((grads, s_grads), (bad, s_bad)):
    for fraction in (0.01, 0.5, 1.0):
      threshold = jax.jit(lambda t, f=fraction: (
          optclip.clip_threshold(t, f), optclip.clip_threshold(t, f, per_leaf=True)))
      want, got = jax.tree.leaves(threshold(tree)), jax.tree.leaves(threshold(s_tree))
      for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
      # Warm-started from a close, a far and no hint: the same τ, sharded or not.
      want = np.asarray(optclip.clip_threshold(tree, fraction))
      for hint in (want * 1.001, want * 1000.0, np.inf):
        got = jax.jit(lambda t, h, f=fraction: optclip.clip_threshold(t, f, hint=h))(
            s_tree, jnp.float32(hint))
        np.testing.assert_array_equal(np.asarray(got), want)
  # Several clipped steps (each warm-started from the last τ) sharded equal unsharded.
  tx = optclip.adam(1e-3, clip=0.5)
  state, s_state = tx.init(grads), tx.init(s_grads)
  step = jax.jit(tx.update)
  for i in range(3):
    g = jax.tree.map(lambda x: x * (1 + 0.01 * i), grads)
    s_g = jax.tree.map(lambda x: x * (1 + 0.01 * i), s_grads)
    want, state = step(g, state, g)
    got, s_state = step(s_g, s_state, s_g)
    for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(h), np.asarray(w), rtol=1e-6, atol=1e-9)
    (clip_state, s_clip_state), = zip(optclip.clip_states(state).values(),
                                      optclip.clip_states(s_state).values())
    np.testing.assert_array_equal(np.asarray(s_clip_state.threshold),
                                  np.asarray(clip_state.threshold))
    for w, h in zip(clip_state, s_clip_state):  # the norms: sums in another order
      np.testing.assert_allclose(np.asarray(h), np.asarray(w), rtol=1e-5)


def check_convolution_and_embedding(mesh):
  """K directions through a convolution over a data-split batch (vmap would reshape the split
  axis) and an embedding lookup with data-split ids give the unsharded sharpness."""
  from optclip.models.layers import embedding_lookup
  rng = np.random.default_rng(2)
  params = {"table": jnp.asarray(rng.standard_normal((20, 6)), jnp.float32),
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 6, 4)) * 0.3, jnp.float32)}
  ids = jnp.asarray(rng.integers(0, 20, (8, 5, 5)))

  def loss_fn(p, ids):
    x = embedding_lookup(p["table"], ids)  # (8, 5, 5, 6) NHWC
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(y) ** 2)

  directions = jax.tree.map(lambda x: jnp.stack([x, x ** 2, -x]), params)
  want = optclip.directional_sharpness(lambda p: loss_fn(p, ids), params, directions)
  s_ids = sharding.shard_batch(ids, mesh)
  s_params = sharding.shard_params(params, mesh, min_size=0)
  s_directions = sharding.shard_params(directions, mesh, min_size=0)
  s_loss = sharding.gathered_loss(loss_fn)
  got = jax.jit(lambda p, d: optclip.directional_sharpness(lambda q: s_loss(q, s_ids), p, d))(
      s_params, s_directions)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def check_checkpoint_onto_another_mesh(s_params, params, spec):
  """Saved on this mesh, restored onto another shape (orbax reshards on restore)."""
  from experiments.artifacts import checkpoints
  other = sharding.mesh_from_spec("data=1,fsdp=8" if spec != "data=1,fsdp=8" else
                                  "data=4,fsdp=2")
  with tempfile.TemporaryDirectory() as out:
    checkpoints.save(out, "unit", 1, s_params)
    with jax.set_mesh(other):
      like = sharding.shard_params(params, other, min_size=256)
      restored = checkpoints.restore(out, "unit", 1, like)
  for name in params:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(params[name]))
    assert restored[name].sharding == like[name].sharding, name


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  for spec in sys.argv[1:]:
    check(spec)
