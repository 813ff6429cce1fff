"""Pseudo-update probes (Pan & Li 2023, Appendix B.3).

Training follows ONE trajectory (SGD-momentum or Adam). Every step's gradient is also fed to
the states of all probe optimizers, whose updates are computed but never applied; at probe
points each optimizer's would-be update direction is read off, so that all directions are
compared in the same local geometry.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import optax

__all__ = [
    "ProbePoint",
    "init_pseudo_updates",
    "pseudo_updates",
    "step_pseudo_updates",
    "train_with_probes",
]


def init_pseudo_updates(optimizers: Mapping[str, optax.GradientTransformation], params):
  """The initial states of every probe optimizer."""
  return {name: tx.init(params) for name, tx in optimizers.items()}


def step_pseudo_updates(optimizers: Mapping[str, optax.GradientTransformation], states,
                        grads, params):
  """Feeds one gradient to every optimizer; returns ({name: would-be update}, new states)."""
  updates, new_states = {}, {}
  for name, tx in optimizers.items():
    updates[name], new_states[name] = tx.update(grads, states[name], params)
  return updates, new_states


def pseudo_updates(optimizers: Mapping[str, optax.GradientTransformation],
                   grads_sequence: Iterable, params_sequence: Iterable):
  """Runs every optimizer's state along a shared sequence of (gradient, params).

  Returns:
    ({name: the update each optimizer would apply after the last gradient}, final states).
  """
  states, updates = None, None
  step = jax.jit(lambda states, grads, params: step_pseudo_updates(
      optimizers, states, grads, params))
  for grads, params in zip(grads_sequence, params_sequence):
    if states is None:
      states = init_pseudo_updates(optimizers, params)
    updates, states = step(states, grads, params)
  return updates, states


class ProbePoint(NamedTuple):
  step: int
  params: Any  # the trajectory's parameters at the probe, before the update
  grads: Any
  updates: dict  # {name: would-be update at this point}
  loss: Any


def train_with_probes(loss_fn: Callable, params, batches: Iterable,
                      train_optimizer: optax.GradientTransformation,
                      probe_optimizers: Mapping[str, optax.GradientTransformation],
                      probe_steps: Iterable[int]):
  """Trains along ``train_optimizer``'s trajectory and yields a `ProbePoint` at each probe step.

  ``loss_fn(params, batch) -> scalar``. At a probe step t (0-based, counted in batches), the
  probe point holds x_t and every probe optimizer's update computed from g_1..g_t at x_t.

  Yields:
    `ProbePoint` for each step in ``probe_steps``; the final params come back as the
    generator's return value.
  """
  probe_steps = set(probe_steps)
  train_state = train_optimizer.init(params)
  probe_states = init_pseudo_updates(probe_optimizers, params)

  @jax.jit
  def step(params, train_state, probe_states, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, train_state = train_optimizer.update(grads, train_state, params)
    probe_updates, probe_states = step_pseudo_updates(probe_optimizers, probe_states, grads,
                                                      params)
    return (optax.apply_updates(params, updates), train_state, probe_states, probe_updates,
            grads, loss)

  for t, batch in enumerate(batches):
    new_params, train_state, probe_states, probe_updates, grads, loss = step(
        params, train_state, probe_states, batch)
    if t in probe_steps:
      yield ProbePoint(t, params, grads, probe_updates, loss)
    params = new_params
  return params
