"""GPT-Neo in Flax, numerically matching transformers' GPTNeoForCausalLM.

Alternating global and local (sliding-window) causal attention as listed by the config's
``attention_types``; like the original, attention scores are NOT scaled by 1/√d and are
computed in float32. Learned positions, pre-norm blocks, gelu_new MLP, tied head.
Dropout is not applied (deterministic loss for the probes).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from optclip.models import layers
from optclip.models.layers import (activation, mask_bias, token_count, token_cross_entropy,
                                   token_loss_sum)


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
  vocab_size: int = 50257
  max_position_embeddings: int = 2048
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int | None = None  # None: 4 × hidden_size
  window_size: int = 256
  attention_types: tuple = ((("global", "local"), 6),)
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  tie_word_embeddings: bool = True
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  model_type: str = dataclasses.field(default="gpt_neo", init=False)
  architecture: str = dataclasses.field(default="GPTNeoForCausalLM", init=False)

  @property
  def attention_layers(self) -> list[str]:
    layers = []
    for kinds, repeat in self.attention_types:
      layers.extend(list(kinds) * repeat)
    return layers

  @property
  def inner_size(self) -> int:
    return self.intermediate_size or 4 * self.hidden_size


PRESETS = {
    "gpt-neo-125M": GPTNeoConfig(),
    "gpt-neo-tiny": GPTNeoConfig(vocab_size=512, max_position_embeddings=256, hidden_size=64,
                                 num_layers=2, num_heads=4, window_size=32,
                                 attention_types=((("global", "local"), 1),)),
    "gpt-neo-mini": GPTNeoConfig(vocab_size=384, max_position_embeddings=64, hidden_size=32,
                                 num_layers=2, num_heads=4, window_size=8,
                                 attention_types=((("global", "local"), 1),)),
    "gpt-neo-micro": GPTNeoConfig(vocab_size=128, max_position_embeddings=64, hidden_size=32,
                                  num_layers=2, num_heads=4, window_size=4,
                                  attention_types=((("global", "local"), 1),)),
    # Half micro's width: the smallest size of experiments.scaling's ladder (micro and mini
    # differ only in vocabulary and window, which the tasks set, so not in size).
    "gpt-neo-nano": GPTNeoConfig(vocab_size=128, max_position_embeddings=64, hidden_size=16,
                                 num_layers=2, num_heads=4, window_size=4,
                                 attention_types=((("global", "local"), 1),)),
}


class Block(nn.Module):
  config: GPTNeoConfig
  local: bool

  @nn.compact
  def __call__(self, hidden, padding_mask):
    cfg = self.config
    dense = lambda n, name, bias=True: nn.Dense(
        n, use_bias=bias, name=name, kernel_init=nn.initializers.normal(cfg.initializer_range))
    length = hidden.shape[1]
    query, key = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = key <= query
    if self.local:
      allowed &= query - key < cfg.window_size
    allowed = allowed[None, None] & padding_mask[:, None, None, :]

    normed = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_1")(hidden)
    head_dim = cfg.hidden_size // cfg.num_heads
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, head_dim))
    q = split(dense(cfg.hidden_size, "q_proj", False)(normed)).astype(jnp.float32)
    k = split(dense(cfg.hidden_size, "k_proj", False)(normed)).astype(jnp.float32)
    v = split(dense(cfg.hidden_size, "v_proj", False)(normed))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + mask_bias(allowed)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(hidden.shape)
    hidden = hidden + dense(cfg.hidden_size, "out_proj")(attended)

    normed = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_2")(hidden)
    inner = activation(cfg.activation_function)(dense(cfg.inner_size, "c_fc")(normed))
    return hidden + dense(cfg.hidden_size, "c_proj")(inner)


class GPTNeo(nn.Module):
  """GPTNeoForCausalLM. ``__call__`` returns logits (batch, length, vocab).

  ``remat`` names a `layers.REMAT_POLICIES` policy applied to every block (the same values
  and parameters; reverse mode keeps one block's activations at a time)."""
  config: GPTNeoConfig
  remat: str = ""

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    wte = layers.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="wte")
    wpe = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       name="wpe")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    padding_mask = attention_mask.astype(bool)
    hidden = wte(input_ids) + wpe(jnp.arange(input_ids.shape[1]))[None]
    block = layers.remat(Block, self.remat)
    for i, kind in enumerate(cfg.attention_layers):
      hidden = block(cfg, kind == "local", name=f"h_{i}")(hidden, padding_mask)
    hidden = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_f")(hidden)
    if cfg.tie_word_embeddings:
      return wte.attend(hidden)
    return nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head", kernel_init=init)(hidden)


def dummy_batch(config: GPTNeoConfig, batch: int = 1, length: int = 8):
  ids = jnp.ones((batch, length), jnp.int32)
  return {"input_ids": ids, "attention_mask": ids, "labels": ids}


def logits_fn(model: GPTNeo, params, batch):
  return model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"))


def loss_fn(model: GPTNeo, params, batch):
  """Next-token cross-entropy: position t predicts ``labels[t+1]`` (-100 = ignored), as HF."""
  logits = logits_fn(model, params, batch)
  return token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])


def loss_sum(model: GPTNeo, params, batch):
  """`loss_fn` before its division by `loss_count` (micro-batching sums these)."""
  return token_loss_sum(logits_fn(model, params, batch)[:, :-1], batch["labels"][:, 1:])


def loss_count(model: GPTNeo, batch):
  return token_count(batch["labels"][:, 1:])
