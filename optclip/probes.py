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

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204), Appendix B.3.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import optax

__all__ = ["PseudoUpdateState", "pseudo_updates", "with_pseudo_updates"]


class PseudoUpdateState(NamedTuple):
  """State of `with_pseudo_updates`: the training optimizer's and every probe's."""
  train: optax.OptState
  probes: dict  # {name: state of that probe optimizer}


class PseudoUpdateTransformation(NamedTuple):
  """An `optax.GradientTransformation` that also carries its probe optimizers."""
  init: Any
  update: Any
  probes: Mapping[str, optax.GradientTransformation]


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
  probes = dict(probes)

  def init_fn(params):
    return PseudoUpdateState(train.init(params),
                             {name: tx.init(params) for name, tx in probes.items()})

  def update_fn(updates, state, params=None):
    new_probes = {name: tx.update(updates, state.probes[name], params)[1]
                  for name, tx in probes.items()}
    updates, train_state = train.update(updates, state.train, params)
    return updates, PseudoUpdateState(train_state, new_probes)

  return PseudoUpdateTransformation(init_fn, update_fn, probes)


def pseudo_updates(tx: PseudoUpdateTransformation, state: PseudoUpdateState, grads,
                   params=None) -> dict:
  """{name: the update each probe optimizer would apply for ``grads`` from ``state``}.

  Nothing is applied and no state is advanced: at a probe point x_t, the directions every
  probe optimizer would take from the same history g_1..g_{t-1} and gradient ``grads``.
  """
  return {name: probe.update(grads, state.probes[name], params)[0]
          for name, probe in tx.probes.items()}
