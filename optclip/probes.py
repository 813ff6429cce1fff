"""Pseudo-update probes (Pan & Li 2023, Appendix B.3) as an optax transformation.

Training follows ONE optimizer's trajectory (SGD-momentum or Adam in the paper). Every step's
gradient is also fed to the states of all probe optimizers, whose updates are computed but
never applied ("pseudo-update steps"); at a probe point each probe optimizer's would-be
update direction is read off, so that all directions are compared in the same local
geometry::

    tx = optclip.probes.with_pseudo_updates(
        optclip.sgd(2e-4), {"sgd": optclip.sgd(1.0), "adam": optclip.adam(1.0)})
    state = tx.init(params)
    for batch in batches:                       # an ordinary optax training loop
      grads = jax.grad(loss_fn)(params, batch)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    # at a probe point: every probe optimizer's next update at the current params
    directions = optclip.probes.pseudo_updates(tx, state, next_grads, params)

`following` trains along one of the probes instead (its update times a learning rate), with
the probe's name and the rate in the state, so that one compiled training step serves every
trajectory; ``update_with_probes`` also returns every probe's update of that step.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204), Appendix B.3.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["FollowState", "PseudoUpdateState", "following", "pseudo_updates",
           "with_pseudo_updates"]


class PseudoUpdateState(NamedTuple):
  """The training optimizer's state and every probe's."""
  train: optax.OptState
  probes: dict  # {name: state of that probe optimizer}


class PseudoUpdateTransformation(NamedTuple):
  """An `optax.GradientTransformation` that also carries its probe optimizers.

  ``update_with_probes(grads, state, params)`` returns ``(updates, state, probe_updates)``,
  the last the probes' updates of this step stacked along a leading axis in ``probes``'
  order (what a probe point reads off).
  """
  init: Callable
  update: Callable
  probes: Mapping[str, optax.GradientTransformation]
  update_with_probes: Callable


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _make(probes, init_train: Callable, train_update: Callable) -> PseudoUpdateTransformation:
  """The transformation around ``train_update(grads, train_state, params, probe_updates)``."""
  probes = dict(probes)

  def init_fn(params):
    return PseudoUpdateState(init_train(params),
                             {name: tx.init(params) for name, tx in probes.items()})

  def update_with_probes(grads, state, params=None):
    results = {name: tx.update(grads, state.probes[name], params)
               for name, tx in probes.items()}
    probe_updates = [results[name][0] for name in probes]
    updates, train_state = train_update(grads, state.train, params, probe_updates)
    new_state = PseudoUpdateState(train_state, {n: r[1] for n, r in results.items()})
    return updates, new_state, _stack(probe_updates)

  def update_fn(updates, state, params=None):
    return update_with_probes(updates, state, params)[:2]

  return PseudoUpdateTransformation(init_fn, update_fn, probes, update_with_probes)


def with_pseudo_updates(train: optax.GradientTransformation,
                        probes: Mapping[str, optax.GradientTransformation]
                        ) -> PseudoUpdateTransformation:
  """``train``'s updates, while every probe optimizer's state follows the same gradients.

  The update returned is ``train``'s alone; each probe's own update is computed (its state
  advances as if it were training) and discarded. Use `pseudo_updates` to read the probes'
  would-be updates at a point.

  Args:
    train: the optimizer whose updates are applied.
    probes: {name: optimizer} whose states follow the trajectory.

  Returns:
    A gradient transformation (usable wherever optax expects one) with state
    `PseudoUpdateState`, and the probes as its ``probes`` field.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> tx = optclip.probes.with_pseudo_updates(optclip.sgd(0.1), {"adam": optclip.adam(1.0)})
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([1., -2.]), state)
    >>> optclip.probes.pseudo_updates(tx, state, jnp.array([1., -2.]))["adam"].round(4)
    Array([-1.,  1.], dtype=float32)

  References:
    Pan & Li 2023, arXiv 2306.00204, Appendix B.3 ("Pseudo-Update Step").
  """
  return _make(probes, train.init,
               lambda grads, state, params, probe_updates: train.update(grads, state, params))


class FollowState(NamedTuple):
  """What `following` trains along: the probe's index in ``probes`` and the rate."""
  index: jax.Array
  learning_rate: jax.Array


def following(probes: Mapping[str, optax.GradientTransformation], name: str,
              learning_rate: float, *, static: bool = False) -> PseudoUpdateTransformation:
  """Trains along probe ``name``: its update times ``learning_rate`` is applied.

  The probes should have unit learning rates, so that ``learning_rate`` is the trajectory's
  (``following({"sgd": optclip.sgd(1.0), ...}, "sgd", 0.1)`` trains like
  ``optclip.sgd(0.1)``). The name's index and the rate live in the state: one compiled step
  serves every trajectory and rate, choosing the followed update with a sum of selects over
  every probe's. With ``static=True`` the name is fixed when the step is traced instead:
  the other probes' updates are then never formed (only their states advance), which
  saves their memory at the cost of one compiled step per followed probe. The state is
  the same either way.

  Example:
    >>> import jax.numpy as jnp, optclip
    >>> probes = {"sgd": optclip.sgd(1.0, momentum=0.0), "adam": optclip.adam(1.0)}
    >>> tx = optclip.probes.following(probes, "sgd", 0.1)
    >>> updates, state = tx.update(jnp.array([1., -2.]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.1,  0.2], dtype=float32)
  """
  names = list(probes)
  if name not in names:
    raise ValueError(f"following: {name!r} is not one of the probes {names}")

  def init_train(params):
    return FollowState(jnp.asarray(names.index(name), jnp.int32),
                       jnp.asarray(learning_rate, jnp.float32))

  def train_update(grads, state, params, probe_updates):
    if static:
      chosen = probe_updates[names.index(name)]
    else:
      chosen = jax.tree.map(
          lambda *leaves: sum(jnp.where(state.index == k, leaf, jnp.zeros_like(leaf))
                              for k, leaf in enumerate(leaves)), *probe_updates)
    updates = jax.tree.map(lambda u: (state.learning_rate * u).astype(u.dtype), chosen)
    return updates, state

  return _make(probes, init_train, train_update)


def pseudo_updates(tx: PseudoUpdateTransformation, state: PseudoUpdateState, grads,
                   params=None, *, with_states: bool = False):
  """{name: the update each probe optimizer would apply for ``grads`` from ``state``}.

  Nothing is applied: at a probe point x_t, the directions every probe optimizer would take
  from the same history g_1..g_{t-1} and gradient ``grads``. With ``with_states`` the
  states those updates would leave are returned too, as ``(updates, {name: state})`` (to
  read what a clipped probe's clip did, say).
  """
  results = {name: probe.update(grads, state.probes[name], params)
             for name, probe in tx.probes.items()}
  updates = {name: result[0] for name, result in results.items()}
  if with_states:
    return updates, {name: result[1] for name, result in results.items()}
  return updates
