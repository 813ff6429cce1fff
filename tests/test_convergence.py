"""The learning-rate sweep: the vectorised trainer against separate runs, and the verdict
rules on constructed pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.training import loop, sweep
from experiments.training.variants import Variant


def _problem():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) * 0.3,
            "b": jnp.zeros(3)}

  def loss_fn(p, batch):
    logits = jnp.tanh(batch["x"] @ p["w"] + p["b"])
    return jnp.mean((logits - batch["y"]) ** 2)

  def train_of(seed):
    data_rng = np.random.default_rng(seed)
    x = data_rng.standard_normal((24, 6)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, :3] * 0.7).astype(np.float32)}
  return params, loss_fn, train_of


def _alone(loss_fn, tx, params, data, seed, epochs, batch_size):
  """(epoch mean losses, final params) of one run with the ordinary training loop."""
  step = loop.train_step(loss_fn, tx)
  state = loop.initial_state(tx, params)
  losses = []
  for epoch in range(epochs):
    epoch_losses = []
    for batch in sweep.batches(data, batch_size, seed, epoch):
      state, loss = step(state, batch)
      epoch_losses.append(float(loss))
    losses.append(np.mean(epoch_losses))
  return losses, state.params


@pytest.mark.slow  # long on 2 cores (25-50 s): outside the default suite's budget
def test_vectorised_sweep_equals_separate_runs():
  """Every copy of one compiled program (its own rate and data) trains as that run alone
  with the ordinary loop: within 1e-5 with the same (rate-injected) optimizer (vmapped
  products round differently, and a rate of 3 amplifies it), and
  within 1e-4 of the plain one (whose rate is a constant folded differently; the clip
  amplifies that rounding over the steps)."""
  params, loss_fn, train_of = _problem()
  runs = [sweep.Run(0.05, 1), sweep.Run(0.3, 1), sweep.Run(0.3, 2), sweep.Run(3.0, 2)]
  for variant in (Variant("adam"), Variant("adam", clip=0.5), Variant("sgd", clip=0.1)):
    compiled = sweep.programs(loss_fn, variant.make(1.0, tunable=True))
    curves = sweep.train_copies(compiled, lambda seed: params, train_of, runs, epochs=3,
                                batch_size=8)
    for index, run in enumerate(runs):
      data = train_of(run.seed)
      for tunable, rtol in ((True, 1e-5), (False, 1e-4)):
        losses, final = _alone(loss_fn, variant.make(run.learning_rate, tunable=tunable),
                               params, data, run.seed, 3, 8)
        np.testing.assert_allclose(curves.epoch_losses[index], losses, rtol=rtol,
                                   err_msg=f"{variant.label} {run} tunable={tunable}")
        np.testing.assert_allclose(curves.final_loss[index], float(loss_fn(final, data)),
                                   rtol=rtol)
      np.testing.assert_allclose(curves.start_loss[index], float(loss_fn(params, data)),
                                 rtol=1e-6)


def _run(rate, seed, final, start=4.0, epochs=3):
  """A sweep run whose epoch losses fall linearly from ``start`` to ``final``."""
  losses = (list(np.linspace(start, final, epochs + 1)[1:]) if np.isfinite(final)
            else [final] * epochs)
  return {"learning_rate": rate, "seed": seed, "start_loss": start, "final_loss": final,
          "epoch_losses": losses}


def _member_records(task, label, best_j, final_at, tuning=(100, 101), evaluation=(0, 1, 2)):
  """Tuning records of a member whose loss is lowest at 2^best_j (a parabola in j, diverging
  four octaves above it), and its evaluation at its own rate with ``final_at(seed)``."""
  from experiments.sections import convergence
  loss = lambda j: 1.0 + 0.1 * (j - best_j) ** 2 if j < best_j + 4 else float("inf")
  runs = [_run(convergence.lattice_rate(j), tuning[0], loss(j))
          for j in range(best_j - 12, best_j + 7, 3)]
  runs += [_run(convergence.lattice_rate(j), s, loss(j)) for s in tuning
           for j in range(best_j - 2, best_j + 3)]
  # The loss at the lowest coarse rate barely moves: start 4.0, end 1 + 0.1·144 → diverged
  # by our rule (above its start), so add one that barely moves.
  runs.append(_run(convergence.lattice_rate(best_j - 9), tuning[0], 3.9))
  base = dict(task=task, algorithm=label, steps_per_epoch=10, tuning_seeds=list(tuning))
  rate = convergence.lattice_rate(best_j)
  return [dict(base, experiment="convergence", stage="coarse", runs=runs),
          dict(base, experiment="convergence", stage="evaluation", own_rate=rate,
               runs=[_run(rate, s, final_at(s)) for s in evaluation])]


def _pair(unclipped_final, clipped_final, clipped_best=-5):
  from experiments.sections import convergence
  unclipped, clipped = convergence.PAIRS["translation"][1]  # adam / adam, clip grad 0.5
  records = (_member_records("translation", unclipped.label, -7, unclipped_final)
             + _member_records("translation", clipped.label, clipped_best, clipped_final))
  # The control: the unclipped optimizer at the clipped member's rate.
  records[1]["runs"] += [_run(convergence.lattice_rate(clipped_best), s, 2.0)
                         for s in (0, 1, 2)]
  return convergence.pair_scores(records, "translation", unclipped, clipped, (100, 101))


def test_verdict_rules_on_constructed_pairs():
  """Clipped better on every seed: reproduced; worse: not reproduced; the same up to noise
  of both signs: inconclusive. The rule reads the interval of the paired differences."""
  noise = {0: 0.01, 1: -0.01, 2: 0.0}
  better = _pair(lambda s: 1.5 + noise[s], lambda s: 1.2 + noise[s])
  worse = _pair(lambda s: 1.2 + noise[s], lambda s: 1.5 + noise[s])
  tie = _pair(lambda s: 1.3 + noise[s], lambda s: 1.3 - noise[s])
  assert better["bracketed"] and worse["bracketed"] and tie["bracketed"]
  assert better["status"] == "reproduced" and better["difference"][1] > 0
  assert worse["status"] == "not reproduced" and worse["difference"][2] < 0
  assert tie["status"] == "inconclusive"
  np.testing.assert_allclose(better["difference"][0], 0.3, rtol=1e-9)
  # The control's score: unclipped at the clipped rate (2.0) minus clipped (1.2).
  np.testing.assert_allclose(better["clip_effect"][0], 0.8, rtol=1e-9)


def test_an_optimum_at_the_grid_edge_is_unbracketed_and_inconclusive():
  from experiments.sections import convergence
  records = _member_records("translation", "adam", -7, lambda s: 1.0)
  # Drop every rate above the best: nothing diverges above it, no two points above it.
  for record in records:
    record["runs"] = [r for r in record["runs"] if r["learning_rate"] <= 2.0 ** -7]
  bracket = convergence.bracketing(records[:1], (100, 101))
  assert bracket["best"] == -7 and not bracket["bracketed"]
  assert set(bracket["missing"]) == {"two above", "diverges above"}
  assert convergence.status_of(0.1, 0.2, bracket["bracketed"]) == "inconclusive"
  full = convergence.bracketing(_member_records("translation", "adam", -7,
                                                lambda s: 1.0)[:1], (100, 101))
  assert full["bracketed"] and full["best"] == -7 and full["rate"] == 2.0 ** -7
