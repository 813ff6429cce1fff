"""Pieces shared by the models: token cross-entropy, HF-style activations, initializers."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optclip.sharding import explicit_spec

IGNORE_INDEX = -100  # the label value PyTorch/transformers leave out of the loss


def gelu_new(x):
  """GPT-2/GPT-Neo's tanh approximation of GELU (transformers' ``gelu_new``)."""
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def relu(x):
  """max(x, 0) with derivative 0 at 0, as jax.nn.relu, but without its custom_jvp rule:
  `jax.experimental.jet` (Taylor-mode sharpness) leaks tracers through custom_jvp calls."""
  return x * (x > 0).astype(x.dtype)  # a product, not a select: also under sharded jet


ACTIVATIONS = {
    "relu": relu,
    "gelu": gelu_exact,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "tanh": jnp.tanh,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def embedding_lookup(table, ids):
  """``table[ids]``; under explicit sharding the rows follow the ids' batch split.

  JAX cannot infer the output sharding of a gather from a replicated table with indices split
  along ``data``, so it is stated: the ids' spec plus an unsplit feature axis.
  """
  spec = explicit_spec(ids)
  if spec is None:
    return jnp.take(table, ids, axis=0)
  return table.at[ids].get(out_sharding=PartitionSpec(*spec, None))


class Embed(nn.Embed):
  """`flax.linen.Embed` (same parameters) whose lookup works on data-sharded ids."""

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (embedding,) = nn.dtypes.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    return embedding_lookup(embedding, inputs)


def _label_log_probs(logits, labels):
  """log softmax(logits)[label] along the last axis, in float32.

  As ``logits[label] - logsumexp(logits)``, so the (tokens, vocabulary) array of
  log-probabilities is never formed: value and gradient of the loss at GPT-Neo's 50K
  vocabulary took half the time of ``log_softmax`` + pick on CPU.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_loss_sum(logits, labels):
  """The sum of the token cross-entropies whose label is not IGNORE_INDEX (padding)."""
  keep = labels != IGNORE_INDEX
  log_probs = _label_log_probs(logits, jnp.where(keep, labels, 0))
  return jnp.sum(jnp.where(keep, -log_probs, 0.0))


def token_count(labels):
  """How many tokens `token_cross_entropy` divides by: the kept ones (at least 1)."""
  return jnp.maximum(jnp.sum(labels != IGNORE_INDEX), 1)


def token_cross_entropy(logits, labels):
  """Mean cross-entropy over tokens whose label is not IGNORE_INDEX (padding).

  Matches ``torch.nn.CrossEntropyLoss(ignore_index=-100)``: a sum over kept tokens divided by
  their count. Computed in float32 whatever the logits' dtype. Micro-batched, the sum is
  taken per micro-batch and the count over the whole batch (`optclip.microbatch`).
  """
  return token_loss_sum(logits, labels) / token_count(labels)


def classification_loss_sum(logits, labels):
  """The sum of the cross-entropies of integer class labels."""
  return -jnp.sum(_label_log_probs(logits, labels))


def classification_cross_entropy(logits, labels):
  """Mean cross-entropy of integer class labels."""
  return -jnp.mean(_label_log_probs(logits, labels))


REMAT_POLICIES = {
    "": None,  # no rematerialisation
    "nothing": "nothing_saveable",  # keep only the block's inputs; recompute the rest
    "dots": "dots_with_no_batch_dims_saveable",  # keep the weight products' outputs
}


def remat(module_class, policy: str, **kwargs):
  """``module_class`` rematerialised per call by `flax.linen.remat` with the named policy
  of `REMAT_POLICIES` (the class itself for ""): reverse mode then keeps one block's
  activations instead of all of them. Parameters keep their names."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat: unknown policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
  if not policy:
    return module_class
  return nn.remat(module_class, policy=getattr(jax.checkpoint_policies,
                                               REMAT_POLICIES[policy]), **kwargs)


def mask_bias(allowed, dtype=jnp.float32):
  """0 where attention is allowed, the dtype's most negative value elsewhere (as transformers)."""
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)
