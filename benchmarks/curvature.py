"""Curvature suite vs the PyTorch tools (PyHessian, curvlinops, hessian-eigenthings) on the
same model weights and batch: our GPT-Neo saved as a Hugging Face checkpoint and loaded by
transformers' GPTNeoForCausalLM, its causal-LM loss on one batch.

* Top eigenvalue at equal relative accuracy: each tool's smallest iteration budget whose
  estimate is within ``--tol`` (relative) of a reference (our Lanczos with 150 products),
  and the time of that run.
* Trace at equal error: each estimator's smallest budget (Hessian-vector products) within
  ``--trace-tol`` of a reference (Hutch++ with 900 products), and its time.

Times are wall-clock medians on the CPU (torch and XLA both use the machine's cores); ours are
reported after compilation, with the compile time beside. Ratios > 1: optclip is faster.

Usage: python -m benchmarks.curvature [--model gpt-neo-tiny] [--batch 8] [--length 64]
(needs the benchmark extras: pip install -e ".[bench]")
"""

import argparse
import time

import jax
import numpy as np

from benchmarks import language_model
from optclip import curvature

EIGEN_BUDGETS = (10, 15, 20, 30, 40, 60, 80, 120)
TRACE_BUDGETS = (15, 30, 60, 120, 240, 480)


def _timed(fn, repeats=3):
  fn()  # warm-up (and compile, for ours)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), fn()


def _first_within(name, budgets, run, reference, tol):
  """(budget, seconds, value) of the first budget whose value is within tol of reference."""
  values = []
  for budget in budgets:
    seconds, value = _timed(lambda: float(run(budget)), repeats=1)
    values.append(f"{value:.5g}")
    if abs(value - reference) <= tol * abs(reference):
      return budget, seconds, value
  print(f"  {name}: not within {tol:g} by budget {budgets[-1]} (estimates: "
        f"{', '.join(values)})")
  return budgets[-1], seconds, value


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="gpt-neo-tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--tol", type=float, default=1e-3)
  parser.add_argument("--trace-tol", type=float, default=0.05)
  args = parser.parse_args(argv)

  import torch
  torch.manual_seed(0)
  problem = language_model.gpt_neo(args.model, args.batch, args.length)
  model, params, ids, loss = problem.model, problem.params, problem.ids, problem.loss
  torch_model = language_model.torch_twin(problem)
  t_ids = torch.as_tensor(ids)
  t_loss = lambda m: m(input_ids=t_ids, labels=t_ids).loss
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"{args.model}: {n:,} parameters, batch {args.batch}x{args.length}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(f"loss: jax {float(loss(params)):.6f}, torch {float(t_loss(torch_model).detach()):.6f}")

  # --- top eigenvalue -------------------------------------------------------------------
  top = jax.jit(lambda p, m: curvature.hessian_eigenpairs(loss, p, 1, num_matvecs=m)[0][0],
                static_argnums=1)
  reference = float(top(params, 150))
  print(f"\ntop eigenvalue, reference (Lanczos, 150 products): {reference:.6g}; "
        f"tolerance {args.tol:g} relative")
  rows = {}
  start = time.perf_counter()
  budget_ours = next(m for m in EIGEN_BUDGETS
                     if abs(float(top(params, m)) - reference) <= args.tol * abs(reference))
  compile_s = time.perf_counter() - start
  ours_s, _ = _timed(lambda: top(params, budget_ours).block_until_ready())
  rows["optclip (matfree Lanczos)"] = (budget_ours, ours_s)

  import pyhessian

  class LanguageModelLoss(torch.nn.Module):  # PyHessian calls criterion(model(x), y)
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, x):
      return self.inner(input_ids=x, labels=x).loss

  py = pyhessian.hessian(LanguageModelLoss(torch_model), lambda loss, y: loss,
                         data=(t_ids, t_ids), cuda=False)
  budget, seconds, _ = _first_within(
      "PyHessian", EIGEN_BUDGETS, lambda m: py.eigenvalues(maxIter=m, tol=0.0)[0][0],
      reference, args.tol)
  rows["PyHessian (power iteration)"] = (budget, seconds)

  import curvlinops
  from scipy.sparse.linalg import eigsh
  t_params = [p for p in torch_model.parameters() if p.requires_grad]
  class NextTokenLogits(torch.nn.Module):  # curvlinops: loss_func(model(x), y)
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, x):
      return self.inner(input_ids=x).logits[:, :-1].reshape(-1, model.config.vocab_size)

  hessian_op = curvlinops.HessianLinearOperator(  # one batch: its mean loss, as ours
      NextTokenLogits(torch_model), torch.nn.CrossEntropyLoss(), t_params,
      [(t_ids, t_ids[:, 1:].reshape(-1))], check_deterministic=False)
  scipy_op = hessian_op.to_scipy()
  # ARPACK decides when it has converged: asked for the same relative tolerance, its run
  # is timed and its products counted.
  from scipy.sparse.linalg import LinearOperator
  products = []
  counted = LinearOperator(scipy_op.shape, dtype=np.float32,
                           matvec=lambda v: (products.append(1), scipy_op @ v)[1])
  seconds, value = _timed(lambda: eigsh(counted, k=1, which="LA", tol=args.tol,
                                        return_eigenvectors=False)[0], repeats=1)
  budget = len(products) // 2  # the warm-up call and the timed one
  print(f"  curvlinops/ARPACK: {value:.6g} (relative error {abs(value - reference) / reference:.1e})")
  rows["curvlinops (scipy eigsh, ARPACK)"] = (budget, seconds)

  import hessian_eigenthings as he
  he_op = he.HessianOperator(torch_model, [{"input_ids": t_ids, "labels": t_ids}],
                             he.hf_lm_loss())
  budget, seconds, _ = _first_within(
      "hessian-eigenthings", EIGEN_BUDGETS,
      lambda m: he.lanczos(he_op, k=1, max_iter=m, tol=0.0, which="LA", seed=0).eigenvalues[0],
      reference, args.tol)
  rows["hessian-eigenthings (Lanczos)"] = (budget, seconds)
  _print(rows, "optclip (matfree Lanczos)", f"(ours compiles in {compile_s:.1f} s once)")

  # --- trace ----------------------------------------------------------------------------
  trace = jax.jit(lambda p, m, k: curvature.hessian_trace(loss, p, num_matvecs=m,
                                                          key=jax.random.key(k)).trace,
                  static_argnums=1)
  reference = float(np.mean([float(trace(params, 900, k)) for k in range(3)]))
  print(f"\ntrace, reference (mean of 3 Hutch++ runs of 900 products): {reference:.6g}; "
        f"tolerance {args.trace_tol:g} relative")
  rows = {}
  budget, seconds, _ = _first_within(
      "optclip", TRACE_BUDGETS, lambda m: trace(params, m, 1), reference, args.trace_tol)
  rows["optclip (Hutch++)"] = (budget, seconds)
  budget, seconds, _ = _first_within(
      "PyHessian", TRACE_BUDGETS, lambda m: np.mean(py.trace(maxIter=m, tol=0.0)),
      reference, args.trace_tol)
  rows["PyHessian (Hutchinson)"] = (budget, seconds)
  budget, seconds, _ = _first_within(
      "curvlinops", TRACE_BUDGETS, lambda m: curvlinops.hutchpp_trace(hessian_op, m),
      reference, args.trace_tol)
  rows["curvlinops (Hutch++)"] = (budget, seconds)
  budget, seconds, _ = _first_within(
      "hessian-eigenthings", TRACE_BUDGETS,
      lambda m: he.trace(he_op, num_matvecs=m, method="hutch++", seed=1).estimate,
      reference, args.trace_tol)
  rows["hessian-eigenthings (Hutch++)"] = (budget, seconds)
  _print(rows, "optclip (Hutch++)", "")


def _print(rows, ours, note):
  base = rows[ours][1]
  for name, (budget, seconds) in rows.items():
    print(f"  {name:36s} budget {budget:4d}  {seconds * 1e3:9.1f} ms   "
          f"{seconds / base:6.2f}x optclip's time")
  if note:
    print("  " + note)


if __name__ == "__main__":
  main()
