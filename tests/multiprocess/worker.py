"""One process of the two-process check (run by tests/test_multiprocess.py).

Usage: python worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FOLDER

With 2 processes (4 CPU devices each, joined by jax.distributed on localhost, CPU collectives
by gloo) it runs the sharded clipped-Adam step, the clipping threshold and a K-direction
sharpness, and the curvature suite's Lanczos/SLQ estimates (eigenpairs, density, block
densities, trace, preconditioned sharpness) on a data=2,fsdp=4 mesh spanning both, writes the results (process 0) and an
orbax checkpoint of the sharded parameters (written by both). With 1 process it computes
the same things unsharded and restores that checkpoint, for the test to compare.
"""

import os
import sys

process_id, processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=processes,
                             process_id=process_id)

import optclip  # noqa: E402
from experiments.artifacts import checkpoints  # noqa: E402
from optclip import curvature, sharding  # noqa: E402


def problem():
  rng = np.random.default_rng(0)
  shapes = {"emb": (64, 32), "w1": (32, 128), "w2": (128, 32), "bias": (32,)}
  params = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
  grads = {k: rng.standard_t(2, s).astype(np.float32) for k, s in shapes.items()}
  batch = rng.integers(0, 64, (16, 8))
  return params, grads, batch


def loss_fn(params, batch):
  h = jax.nn.one_hot(batch, 64) @ params["emb"]
  h = jnp.tanh(h @ params["w1"]) @ params["w2"] + params["bias"]
  return jnp.mean(jnp.square(h))


def compute(params, grads, batch, loss):
  tx = optclip.adam(1e-3, clip=0.5)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  threshold = jax.jit(lambda g: optclip.clip_threshold(g, 0.1))(grads)
  directions = jax.tree.map(lambda g: jnp.stack([g, -0.5 * g, g * g]), grads)
  # Arrays spanning several processes must be arguments, not closed over.
  sharp = jax.jit(lambda p, d, b: optclip.directional_sharpness(lambda q: loss(q, b), p, d))(
      params, directions, batch)
  return updates, threshold, sharp


def spectra(params, batch, loss):
  """The curvature suite's pytree Lanczos and SLQ on the same loss: eigenpairs, density,
  block densities, Hutch++ trace and λ_max(P⁻¹H), all from fixed keys."""
  def run(p, b):
    f = lambda q: loss(q, b)
    values, vectors = curvature.hessian_eigenpairs(f, p, 2, num_matvecs=16)
    nodes, weights = curvature.hessian_spectral_density(f, p, num_matvecs=10, num_samples=2)
    blocks = curvature.hessian_block_spectral_densities(
        f, p, {"emb": "embedding", "w1": "mlp", "w2": "mlp", "bias": "other"}, num_matvecs=8,
        num_samples=2)
    preconditioner = jax.tree.map(lambda x: 1.0 + jnp.abs(x), p)
    return {"eigenvalues": values, "nodes": nodes, "weights": weights,
            **{f"eigenvectors_{k}": v for k, v in vectors.items()},
            **{f"block_{k}_nodes": v[0] for k, v in blocks.items()},
            **{f"block_{k}_weights": v[1] for k, v in blocks.items()},
            "trace": curvature.hessian_trace(f, p, num_matvecs=12).trace,
            "preconditioned": curvature.preconditioned_top_eigenvalue(f, p, preconditioner,
                                                                      iters=12)}
  return jax.jit(run)(params, batch)


def gathered(tree):
  """Every process's shards brought together, as NumPy (a multi-process array)."""
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def main():
  params, grads, batch = problem()
  if processes == 1:
    updates, threshold, sharp = compute(params, grads, batch, loss_fn)
    curv = spectra(params, batch, loss_fn)
    like = jax.tree.map(jnp.asarray, params)
    restored = checkpoints.restore(out, "unit", 1, like)
    np.savez(os.path.join(out, "single.npz"), threshold=np.asarray(threshold),
             sharpness=np.asarray(sharp),
             **{f"update_{k}": np.asarray(v) for k, v in updates.items()},
             **{f"restored_{k}": np.asarray(v) for k, v in restored.items()},
             **{f"params_{k}": v for k, v in params.items()},
             **{f"curvature_{k}": np.asarray(v) for k, v in curv.items()})
    return
  mesh = sharding.mesh_from_spec("data=2,fsdp=4")
  with jax.set_mesh(mesh):
    s_params = sharding.shard_params(params, mesh, min_size=256)
    s_grads = sharding.shard_params(grads, mesh, min_size=256)
    s_batch = sharding.shard_batch(batch, mesh)
    assert any(sharding.explicit_spec(x) is not None for x in jax.tree.leaves(s_grads))
    updates, threshold, sharp = compute(s_params, s_grads, s_batch,
                                        sharding.gathered_loss(loss_fn))
    curv = gathered(spectra(s_params, s_batch, sharding.gathered_loss(loss_fn)))
    updates = gathered(updates)
    checkpoints.save(out, "unit", 1, s_params)
  if process_id == 0:
    np.savez(os.path.join(out, "multi.npz"), threshold=np.asarray(threshold),
             sharpness=np.asarray(sharp), **{f"update_{k}": v for k, v in updates.items()},
             **{f"curvature_{k}": v for k, v in curv.items()})
  print("OK", process_id, flush=True)


if __name__ == "__main__":
  main()
