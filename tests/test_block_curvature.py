"""Block spectra, Jensen-Shannon distances and preconditioned sharpness against dense
computations: `jax.hessian` split into its diagonal blocks and `numpy.linalg.eigh`, SciPy's
Jensen-Shannon distance and generalised eigensolver, a NumPy transcription of Adam's
second moment; and the leaf-by-leaf (sharded) paths against the unsharded ones on 8 CPU
devices in a subprocess."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
from jax.flatten_util import ravel_pytree

import optclip
from optclip import blocks, curvature, spectrum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp():
  """A two-layer tanh MLP on a fixed batch, squared error: 3·5 + 5 + 5·2 + 2 = 32 parameters."""
  rng = np.random.default_rng(0)
  params = {"dense_0": {"kernel": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
                        "bias": jnp.asarray(0.1 * rng.standard_normal(5), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.standard_normal((5, 2)), jnp.float32),
                     "bias": jnp.zeros(2)}}
  x = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)

  def loss(p):
    hidden = jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    return 0.5 * jnp.mean(jnp.sum((hidden @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2,
                                  axis=-1))
  return loss, params


def _attention():
  """One pre-norm attention block and MLP with an LM head on 6 tokens (width 4, vocabulary
  7): leaves named as GPT-Neo's, so `blocks.partition` sorts them into kinds."""
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
  width, vocab, length = 4, 7, 6
  params = {"wte": {"embedding": normal(vocab, width)},
            "h_0": {"ln_1": {"scale": jnp.ones(width)},
                    "attn": {"q_proj": {"kernel": normal(width, width)},
                             "k_proj": {"kernel": normal(width, width)},
                             "v_proj": {"kernel": normal(width, width)},
                             "out_proj": {"kernel": normal(width, width)}},
                    "mlp": {"c_fc": {"kernel": normal(width, 2 * width)},
                            "c_proj": {"kernel": normal(2 * width, width)}}},
            "lm_head": {"kernel": normal(width, vocab)}}
  tokens = jnp.asarray(rng.integers(0, vocab, (2, length)))
  mask = jnp.tril(jnp.ones((length, length), bool))

  def loss(p):
    h = p["wte"]["embedding"][tokens[:, :-1]]
    block = p["h_0"]
    normed = h / jnp.sqrt(jnp.mean(h ** 2, -1, keepdims=True) + 1e-6) * block["ln_1"]["scale"]
    q, k, v = (normed @ block["attn"][name]["kernel"] for name in ("q_proj", "k_proj", "v_proj"))
    scores = jnp.where(mask[:-1, :-1], q @ jnp.swapaxes(k, 1, 2) / 2.0, -1e9)
    h = h + jax.nn.softmax(scores) @ v @ block["attn"]["out_proj"]["kernel"]
    h = h + jnp.tanh(h @ block["mlp"]["c_fc"]["kernel"]) @ block["mlp"]["c_proj"]["kernel"]
    logits = h @ p["lm_head"]["kernel"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  return loss, params


def _dense_blocks(loss, params, labels):
  """{block: H_bb} from the dense Hessian of the raveled parameters."""
  flat, unravel = ravel_pytree(params)
  hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  leaf_labels = jax.tree.leaves(labels)
  owners = np.concatenate([np.full(np.size(leaf), i) for i, leaf in
                           enumerate(jax.tree.leaves(params))])
  out = {}
  for name in dict.fromkeys(leaf_labels):
    index = np.flatnonzero(np.isin(owners, [i for i, b in enumerate(leaf_labels) if b == name]))
    out[name] = hessian[np.ix_(index, index)]
  return out


def _supported(nodes, weights):
  """The nodes that carry weight (those past a Krylov breakdown carry none)."""
  nodes, weights = np.asarray(nodes), np.asarray(weights)
  return nodes[weights > 1e-7]


@pytest.mark.parametrize("model", [
    _mlp, pytest.param(_attention, marks=pytest.mark.slow)])  # attention: 30 s on 2 cores
def test_block_spectra_equal_the_dense_blocks_eigenvalues(model):
  loss, params = model()
  labels = blocks.partition(params, by="layer/kind")
  dense = _dense_blocks(loss, params, labels)
  assert len(dense) >= 2
  largest = max(len(h) for h in dense.values())
  densities = curvature.hessian_block_spectral_densities(
      loss, params, labels, num_matvecs=largest, num_samples=2)
  assert list(densities) == list(dense)
  for name, h in dense.items():
    exact = np.linalg.eigvalsh(h)
    nodes, weights = densities[name]
    np.testing.assert_allclose(float(np.sum(weights)), 1.0, rtol=1e-5)
    support = _supported(nodes, weights)
    scale = np.max(np.abs(exact))
    # Both extremes of every block, to 1e-4 of the block's largest |eigenvalue|.
    np.testing.assert_allclose(support.max(), exact.max(), atol=1e-4 * scale, err_msg=name)
    np.testing.assert_allclose(support.min(), exact.min(), atol=1e-4 * scale, err_msg=name)


def test_block_spectra_moments_within_their_standard_error():
  """With m steps SLQ integrates polynomials up to degree 2m - 1 exactly per start vector,
  so its first four moments are Monte Carlo means of vᵀH_bb^k v: within 4 standard errors
  of tr(H_bb^k)/n_b."""
  loss, params = _mlp()
  labels = {"dense_0": {"kernel": "hidden", "bias": "hidden"},
            "head": {"kernel": "head", "bias": "head"}}
  dense = _dense_blocks(loss, params, labels)
  samples, steps = 400, 3
  densities = curvature.hessian_block_spectral_densities(
      loss, params, labels, num_matvecs=steps, num_samples=samples)
  for name, h in dense.items():
    nodes, weights = (np.asarray(x, np.float64).reshape(samples, steps)
                      for x in densities[name])
    weights = weights * samples  # each start vector's own quadrature sums to 1
    for power in range(1, 5):
      exact = np.trace(np.linalg.matrix_power(h, power)) / len(h)
      per_sample = np.sum(weights * nodes ** power, axis=1)
      error = per_sample.std(ddof=1) / np.sqrt(samples)
      assert abs(per_sample.mean() - exact) <= 4 * error + 1e-5 * abs(exact), (name, power)


def test_js_distances_equal_scipys_on_constructed_densities():
  rng = np.random.default_rng(2)
  densities = {f"b{i}": (rng.normal(3.0 * i, 1.0, 12), rng.dirichlet(np.ones(12)))
               for i in range(4)}
  width, points = 0.5, 3000
  js = spectrum.js_distances(densities, width=width, points=points)
  every = np.concatenate([n for n, _ in densities.values()])
  grid = np.linspace(every.min() - 5 * width, every.max() + 5 * width, points)
  curves = {name: np.sum(w[None] * scipy.stats.norm.pdf(grid[:, None], n[None], width), axis=1)
            for name, (n, w) in densities.items()}
  expected = np.array([[scipy.spatial.distance.jensenshannon(curves[a], curves[b])
                        for b in densities] for a in densities])
  np.testing.assert_allclose(js.distances, expected, atol=1e-10)
  assert js.names == list(densities)
  np.testing.assert_allclose(js.mean, expected[np.triu_indices(4, 1)].mean(), rtol=1e-12)
  with pytest.raises(ValueError, match="at least two"):
    spectrum.js_distances({"a": densities["b0"]})


def test_preconditioned_sharpness_equals_the_dense_generalised_problem():
  """λ_max(P⁻¹H) with P from Adam's live state after 5 steps, against SciPy's generalised
  symmetric eigensolver on (H, diag P); P against a NumPy transcription of Adam's ν."""
  loss, params = _mlp()
  tx = optax.adam(1e-2, b2=0.99, eps=1e-6)
  state = tx.init(params)
  second = jax.tree.map(lambda x: np.zeros(x.shape), params)
  p = params
  for step in range(1, 6):
    grads = jax.grad(loss)(p)
    updates, state = tx.update(grads, state)
    p = optax.apply_updates(p, updates)
    second = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * np.asarray(g, np.float64) ** 2,
                          second, grads)
  preconditioner = curvature.adam_preconditioner(state, b2=0.99, eps=1e-6)
  expected_p = jax.tree.map(lambda v: np.sqrt(v / (1 - 0.99 ** 5)) + 1e-6, second)
  for got, want in zip(jax.tree.leaves(preconditioner), jax.tree.leaves(expected_p)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)

  flat, unravel = ravel_pytree(p)
  hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  diagonal = np.asarray(ravel_pytree(preconditioner)[0], np.float64)
  exact = scipy.linalg.eigh(hessian, np.diag(diagonal), eigvals_only=True)[-1]
  value = curvature.preconditioned_top_eigenvalue(loss, p, preconditioner, iters=len(flat))
  np.testing.assert_allclose(float(value), exact, rtol=1e-4)
  # Adam with a clip keeps its own state type; the preconditioner is read from it too.
  clipped = optclip.adam(1e-2, clip=0.5)
  clipped_state = clipped.update(jax.grad(loss)(params), clipped.init(params))[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),  # float32 1 - b2
               curvature.adam_preconditioner(clipped_state),
               jax.tree.map(lambda g: jnp.abs(g) * np.sqrt(1e-3 / (1 - 0.999)) + 1e-8,
                            jax.grad(loss)(params)))
  with pytest.raises(ValueError, match="opt_state"):
    curvature.adam_preconditioner(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="no step"):
    curvature.adam_preconditioner(tx.init(params))


def test_stability_thresholds():
  assert curvature.adam_stability_threshold(2e-3, 0.9) == pytest.approx(3.8 / (0.1 * 2e-3))
  assert curvature.sgd_stability_threshold(0.5) == pytest.approx(4.0)
  assert curvature.sgd_stability_threshold(0.5, 0.5) == pytest.approx(6.0)


def test_block_partition_of_the_attention_model_has_the_kinds():
  _, params = _attention()
  kinds = set(jax.tree.leaves(blocks.partition(params)))
  assert kinds == {"embedding", "norm", "query/key", "value/output", "mlp", "head"}


@pytest.mark.slow  # long on 2 cores (45-210 s): outside the default suite's budget
def test_leaf_by_leaf_spectra_on_sharded_parameters_equal_the_unsharded_ones():
  """Density, block densities, Hutch++ and Hutchinson traces, eigenpairs and the
  preconditioned sharpness under `jax.set_mesh` on 2x4, 1x8 and 8x1 meshes equal the
  unsharded values (rtol 1e-5); prints the all-reduces per Lanczos step."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded",
                                                        "spectra.py")],
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert "OK" in result.stdout
