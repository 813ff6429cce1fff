"""BERT sequence classifier in Flax, numerically matching BertForSequenceClassification.

Post-norm encoder with learned absolute positions and token types, a tanh pooler over the
first token and a linear classifier. Dropout is not applied (deterministic loss).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from optclip.models import layers
from optclip.models.layers import (activation, classification_cross_entropy,
                                   classification_loss_sum, mask_bias)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  num_labels: int = 2
  pad_token_id: int = 0
  model_type: str = dataclasses.field(default="bert", init=False)
  architecture: str = dataclasses.field(default="BertForSequenceClassification", init=False)


PRESETS = {
    "bert-base": BertConfig(),
    "bert-tiny": BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=128),
    "bert-micro": BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64),
}


class Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, hidden, bias):
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, name=name,
                                     kernel_init=nn.initializers.normal(cfg.initializer_range))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, head_dim))
    q, k, v = (split(dense(cfg.hidden_size, name)(hidden)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype) + bias
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(hidden.shape)
    hidden = nn.LayerNorm(cfg.layer_norm_eps, name="attention_norm")(
        hidden + dense(cfg.hidden_size, "attention_output")(attended))
    inner = activation(cfg.hidden_act)(dense(cfg.intermediate_size, "intermediate")(hidden))
    return nn.LayerNorm(cfg.layer_norm_eps, name="output_norm")(
        hidden + dense(cfg.hidden_size, "output")(inner))


class BertClassifier(nn.Module):
  """BertForSequenceClassification. ``__call__`` returns logits (batch, num_labels);
  ``remat`` as in `optclip.models.gpt_neo.GPTNeo`, per encoder layer."""
  config: BertConfig
  remat: str = ""

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None]
    hidden = (layers.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                           name="word_embeddings")(input_ids)
              + layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                             name="position_embeddings")(positions)
              + layers.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                             name="token_type_embeddings")(token_type_ids))
    hidden = nn.LayerNorm(cfg.layer_norm_eps, name="embeddings_norm")(hidden)
    bias = mask_bias(attention_mask.astype(bool))[:, None, None, :]
    layer = layers.remat(Layer, self.remat)
    for i in range(cfg.num_hidden_layers):
      hidden = layer(cfg, name=f"layer_{i}")(hidden, bias)
    pooled = jnp.tanh(nn.Dense(cfg.hidden_size, kernel_init=init, name="pooler")(hidden[:, 0]))
    return nn.Dense(cfg.num_labels, kernel_init=init, name="classifier")(pooled)


def dummy_batch(config: BertConfig, batch: int = 1, length: int = 8):
  ids = jnp.ones((batch, length), jnp.int32)
  return {"input_ids": ids, "attention_mask": ids, "label": jnp.zeros((batch,), jnp.int32)}


def logits_fn(model: BertClassifier, params, batch):
  return model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                     batch.get("token_type_ids"))


def loss_fn(model: BertClassifier, params, batch):
  return classification_cross_entropy(logits_fn(model, params, batch), batch["label"])


def loss_sum(model: BertClassifier, params, batch):
  return classification_loss_sum(logits_fn(model, params, batch), batch["label"])


def loss_count(model: BertClassifier, batch):
  return batch["label"].shape[0]


def per_example_logit_margin(model: BertClassifier, params, batch):
  """The binary classifier's margin z_1 − z_0 per example (the output whose gradients build
  the Gauss-Newton matrix of Table 8)."""
  logits = logits_fn(model, params, batch)
  return logits[:, 1] - logits[:, 0]
