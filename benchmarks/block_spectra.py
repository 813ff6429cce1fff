"""Block spectra (Zhang et al. 2024) against one full-model SLQ and against
hessian-eigenthings' per-block spectra, on the same GPT-Neo weights and batch.

Every density runs ``--steps`` Lanczos steps from ``--samples`` start vectors: the quadrature
of each start vector is exact for polynomials of degree < 2·steps, so at equal steps and
samples a block's density and the full model's have the same accuracy in that sense (their
Monte-Carlo error also depends on each spectrum's spread; the first-moment standard errors
are printed). Reported:

* products: Hessian(-block)-vector products each computation takes (ours: the blocks'
  ``B · samples · steps`` against the full SLQ's ``samples · steps``), and wall time, ours
  compiled (compile time beside) and timed round by round against the full SLQ;
* hessian-eigenthings: its `spectral_density` on a `HessianOperator` restricted by
  ``param_filter`` to each block (the same H_bb), the same steps and samples, timed; and per
  block both tools' top Ritz value and first moment, to show they measure the same thing.

Our blocks share one linearisation of the gradient (`jax.linearize`), so a block product costs
the linear map alone; hessian-eigenthings differentiates the loss again for each product.
An exact H_bb v_b cannot come out of one full product H v (the cross blocks H_bc v_c land in
it), so the blocks' products are B times the full model's at equal steps and samples.

Usage: python -m benchmarks.block_spectra [--model gpt-neo-tiny] [--batch 8] [--length 64]
       [--steps 20] [--samples 2] [--no-torch]
(hessian-eigenthings: pip install -e ".[bench]")
"""

import argparse
import collections
import time

import jax
import numpy as np

from benchmarks import language_model
from benchmarks.timing import interleaved_ms, median_ratio
from optclip import blocks, curvature


def _moments(nodes, weights, samples):
  """(mean over start vectors of Σ w λ / Σ w, its standard error, the top Ritz value)."""
  nodes = np.asarray(nodes, np.float64).reshape(samples, -1)
  weights = np.asarray(weights, np.float64).reshape(samples, -1)
  per_sample = np.sum(nodes * weights, axis=1) / np.sum(weights, axis=1)
  stderr = per_sample.std(ddof=1) / np.sqrt(samples) if samples > 1 else np.nan
  top = float(np.max(np.where(weights > 1e-8, nodes, -np.inf)))
  return float(per_sample.mean()), float(stderr), top


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="gpt-neo-tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--samples", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true", help="skip hessian-eigenthings")
  args = parser.parse_args(argv)

  problem = language_model.gpt_neo(args.model, args.batch, args.length)
  params, ids, loss = problem.params, problem.ids, problem.loss
  labels = blocks.partition(params)
  sizes = collections.Counter()
  for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    sizes[label] += leaf.size
  print(f"{args.model}: {sum(sizes.values()):,} parameters in {len(sizes)} blocks "
        f"({', '.join(f'{k} {v:,}' for k, v in sizes.items())}); batch "
        f"{args.batch}x{args.length}; {args.steps} steps x {args.samples} samples; "
        f"jax {jax.__version__}")

  full = jax.jit(lambda p: curvature.hessian_spectral_density(
      loss, p, num_matvecs=args.steps, num_samples=args.samples))
  split = jax.jit(lambda p: curvature.hessian_block_spectral_densities(
      loss, p, labels, num_matvecs=args.steps, num_samples=args.samples))
  compile_s = {}
  for name, fn in (("full", full), ("blocks", split)):
    start = time.perf_counter()
    jax.block_until_ready(fn(params))
    compile_s[name] = time.perf_counter() - start
  times = interleaved_ms({"full": lambda: full(params), "blocks": lambda: split(params)},
                         rounds=args.rounds)
  full_products = args.steps * args.samples
  block_products = len(sizes) * full_products
  print("\n| computation | products | wall ms (median) | × full SLQ's time | first call s |")
  print("|---|---|---|---|---|")
  print(f"| optclip full-model SLQ | {full_products} | {np.median(times['full']):.0f} | 1.00 | "
        f"{compile_s['full']:.1f} |")
  print(f"| optclip block spectra ({len(sizes)} blocks) | {block_products} | "
        f"{np.median(times['blocks']):.0f} | {median_ratio(times['blocks'], times['full']):.2f}"
        f" | {compile_s['blocks']:.1f} |")
  ours = {name: _moments(*density, args.samples)
          for name, density in split(params).items()}
  if args.no_torch:
    return

  import hessian_eigenthings as he
  import torch
  torch.manual_seed(0)
  torch_model = language_model.torch_twin(problem)
  t_ids = torch.as_tensor(ids)
  data = [{"input_ids": t_ids, "labels": t_ids}]
  # The same blocks by the same rules on the Hugging Face names (a tied lm_head is wte).
  torch_kind = {name: blocks.kind(name.replace(".", "/"))
                for name, _ in torch_model.named_parameters()}
  torch_sizes = collections.Counter()
  for name, p in torch_model.named_parameters():
    torch_sizes[torch_kind[name]] += p.numel()
  assert dict(torch_sizes) == dict(sizes), (torch_sizes, sizes)
  theirs, seconds = {}, 0.0
  for block in sizes:
    operator = he.HessianOperator(torch_model, data, he.hf_lm_loss(),
                                  param_filter=lambda name, _, b=block: torch_kind[name] == b)
    start = time.perf_counter()
    result = he.spectral_density(operator, num_runs=args.samples, lanczos_steps=args.steps,
                                 seed=0, num_grid_points=100)
    seconds += time.perf_counter() - start
    theirs[block] = _moments(result.raw_eigenvalues.numpy(), result.raw_weights.numpy(),
                             args.samples)
  operator = he.HessianOperator(torch_model, data, he.hf_lm_loss())
  start = time.perf_counter()
  he.spectral_density(operator, num_runs=args.samples, lanczos_steps=args.steps, seed=0,
                      num_grid_points=100)
  their_full = time.perf_counter() - start
  base = np.median(times["full"]) / 1e3
  print(f"| hessian-eigenthings full-model SLQ | {full_products} | {their_full * 1e3:.0f} | "
        f"{their_full / base:.2f} | – |")
  print(f"| hessian-eigenthings block spectra (param_filter) | {block_products} | "
        f"{seconds * 1e3:.0f} | {seconds / base:.2f} | – |")
  print(f"\nhessian-eigenthings' block spectra take {seconds / (np.median(times['blocks']) / 1e3):.2f}x "
        f"optclip's time (torch {torch.__version__}, {torch.get_num_threads()} threads)")
  print("\n| block | optclip Σwλ ± s.e. | theirs Σwλ ± s.e. | optclip top Ritz | theirs top Ritz |")
  print("|---|---|---|---|---|")
  for block in sizes:
    (m, e, t), (m2, e2, t2) = ours[block], theirs[block]
    print(f"| {block} | {m:.4g} ± {e:.2g} | {m2:.4g} ± {e2:.2g} | {t:.5g} | {t2:.5g} |")


if __name__ == "__main__":
  main()
