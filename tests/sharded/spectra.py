"""Leaf-by-leaf spectra on explicitly sharded parameters equal the unsharded ones (run by
tests/test_block_curvature.py in a subprocess: JAX fixes the device count at start-up)."""

import os
import re

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from optclip import curvature, sharding, spectrum  # noqa: E402

rng = np.random.default_rng(0)
params = {"w": jnp.asarray(0.1 * rng.standard_normal((128, 128)), jnp.float32),
          "u": jnp.asarray(0.1 * rng.standard_normal((64, 32)), jnp.float32),
          "b": jnp.ones(16)}
# Coordinate scales spread the spectrum (an elementwise loss of equal scales clusters it
# around one value, where Ritz values are ill-conditioned).
scales = {"w": jnp.asarray(np.exp(rng.uniform(-2, 2, (128, 128))), jnp.float32),
          "u": jnp.asarray(np.exp(rng.uniform(-2, 2, (64, 32))), jnp.float32)}
labels = {"w": "w", "u": "u", "b": "b"}
preconditioner = jax.tree.map(lambda x: 1.0 + jnp.abs(x), params)


# Elementwise work and full reductions only: a matmul contracting a sharded axis is the
# user's to annotate under explicit sharding, not this check's subject.
def loss(p):
  return (jnp.sum(scales["w"] * jnp.sin(p["w"]) * p["w"])
          + jnp.sum(p["w"] ** 2) * jnp.sum(p["b"] ** 2)
          + jnp.sum(scales["u"] * jnp.cos(p["u"]) * p["u"] ** 2) + jnp.sum(p["u"]) * jnp.sum(p["b"]))


def everything(p, precondition):
  nodes, weights = curvature.hessian_spectral_density(loss, p, num_matvecs=12, num_samples=2)
  block = curvature.hessian_block_spectral_densities(loss, p, labels, num_matvecs=10,
                                                     num_samples=2)
  values, vectors = curvature.hessian_eigenpairs(loss, p, 2, num_matvecs=24)
  return {"nodes": nodes, "weights": weights,
          **{f"block_{k}_nodes": v[0] for k, v in block.items()},
          **{f"block_{k}_weights": v[1] for k, v in block.items()},
          "hutch++": curvature.hessian_trace(loss, p, num_matvecs=12).trace,
          "hutch++_stderr": curvature.hessian_trace(loss, p, num_matvecs=12).stderr,
          "hutchinson": curvature.hessian_trace(loss, p, num_matvecs=8,
                                                method="hutchinson").trace,
          "eigenvalues": values,
          # |⟨v, e⟩| against a fixed vector: eigenvectors are defined up to sign.
          "eigenvector_w_abs": jnp.abs(jnp.sum(vectors["w"] * p["w"][None], axis=(1, 2))),
          "preconditioned": curvature.preconditioned_top_eigenvalue(loss, p, precondition,
                                                                    iters=16)}


plain = {k: np.asarray(v) for k, v in jax.jit(everything)(params, preconditioner).items()}
for spec in ("data=2,fsdp=4", "data=1,fsdp=8", "data=8,fsdp=1"):
  mesh = sharding.mesh_from_spec(spec)
  with jax.set_mesh(mesh):
    placed = sharding.shard_params(params, mesh, min_size=1)
    placed_p = sharding.shard_params(preconditioner, mesh, min_size=1)
    if mesh.shape["fsdp"] > 1:
      assert sharding.explicit_spec(placed["w"]) is not None, spec
    got = {k: np.asarray(v) for k, v in jax.jit(everything)(placed, placed_p).items()}
    for name, value in plain.items():
      if "weights" in name:
        # Quadrature weights (squared first components of T's eigenvectors) amplify the
        # float32 rounding of the sums' order (up to ~1e-4 on a 16k-coordinate block after
        # 10 steps); what they integrate, the density's moments, agrees to rtol 1e-5.
        nodes_name = name.replace("weights", "nodes")
        np.testing.assert_allclose(got[name], value, atol=2e-4, err_msg=f"{spec} {name}")
        for power in range(1, 5):
          np.testing.assert_allclose(np.sum(got[name] * got[nodes_name] ** power),
                                     np.sum(value * plain[nodes_name] ** power), rtol=1e-5,
                                     err_msg=f"{spec} {name} moment {power}")
        continue
      # A standard error is a difference of near-equal sums: to 1e-3 of itself.
      np.testing.assert_allclose(got[name], value, rtol=1e-3 if "stderr" in name else 1e-5,
                                 atol=1e-6 * float(np.max(np.abs(value))),
                                 err_msg=f"{spec} {name}")
    if mesh.shape["fsdp"] > 1:
      hlo = jax.jit(lambda p: spectrum.top_eigenvalue(
          lambda v: curvature.hessian_vector_product(loss, p, v), p, iters=4)).lower(
              placed).compile().as_text()
      print(spec, "all-reduce ops in the compiled Lanczos program:",
            len(re.findall(r"all-reduce(?:-start)?\(", hlo)))
  print("OK", spec)
