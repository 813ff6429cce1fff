"""T5 encoder-decoder in Flax, numerically matching transformers' T5ForConditionalGeneration.

RMS layer norm without bias, attention without 1/√d scaling (T5 folds it into the initial
weights), relative position buckets shared by all layers of a stack (bidirectional in the
encoder, causal in the decoder), relu or gated-gelu feed-forward, and a tied head scaled by
d_model^-0.5 when ``tie_word_embeddings``. Dropout is not applied: the geometry probes need a
deterministic loss, and the paper's measurements are taken without it.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from optclip.models import layers
from optclip.models.layers import (IGNORE_INDEX, activation, mask_bias, token_count,
                                   token_cross_entropy, token_loss_sum)


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"  # or "gated-gelu"
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  initializer_factor: float = 1.0
  model_type: str = dataclasses.field(default="t5", init=False)
  architecture: str = dataclasses.field(default="T5ForConditionalGeneration", init=False)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_activation(self) -> str:
    name = self.feed_forward_proj.split("-")[-1]
    return "gelu_new" if name == "gelu" else name


PRESETS = {
    "t5-small": T5Config(),
    "t5-tiny": T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                        num_decoder_layers=2, num_heads=4),
    "t5-mini": T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=16,
                        relative_attention_max_distance=32),
    "t5-micro": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                         num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16),
}


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """transformers' T5 bucketing of key_position − query_position (exact in small, log beyond)."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # float32 as torch computes it; the log is only used where relative_position ≥ max_exact ≥ 1
  safe = jnp.maximum(relative_position, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


def _dense(features, std, name):
  return nn.Dense(features, use_bias=False, name=name,
                  kernel_init=nn.initializers.normal(std))


class RMSNorm(nn.Module):
  epsilon: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (scale * (x * jax.lax.rsqrt(variance + self.epsilon))).astype(x.dtype)


class Attention(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, context, bias):
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    f = cfg.initializer_factor
    q = _dense(inner, f * (cfg.d_model * cfg.d_kv) ** -0.5, "q")(x)
    k = _dense(inner, f * cfg.d_model ** -0.5, "k")(context)
    v = _dense(inner, f * cfg.d_model ** -0.5, "v")(context)
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.d_kv))
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) + bias
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(x.shape[:-1] + (inner,))
    return _dense(cfg.d_model, f * inner ** -0.5, "o")(out)


class FeedForward(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    act = activation(cfg.dense_activation)
    std_in, std_out = cfg.initializer_factor * cfg.d_model ** -0.5, cfg.initializer_factor * cfg.d_ff ** -0.5
    if cfg.is_gated:
      hidden = act(_dense(cfg.d_ff, std_in, "wi_0")(x)) * _dense(cfg.d_ff, std_in, "wi_1")(x)
    else:
      hidden = act(_dense(cfg.d_ff, std_in, "wi")(x))
    return _dense(cfg.d_model, std_out, "wo")(hidden)


class PositionBias(nn.Module):
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length, key_length):
    cfg = self.config
    table = self.param("embedding", nn.initializers.normal(cfg.initializer_factor * cfg.d_model ** -0.5),
                       (cfg.relative_attention_num_buckets, cfg.num_heads))
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    buckets = relative_position_bucket(relative, self.bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, heads, q, k)


class Block(nn.Module):
  """One encoder or decoder block. It shares its stack's scope (`flax.linen.share_scope`),
  so its parameters keep the stack-level names ``block_<i>_...`` (those of HF checkpoints)
  while it can be rematerialised as a unit."""
  config: T5Config
  index: int
  is_decoder: bool

  @nn.compact
  def __call__(self, hidden, bias, encoder_hidden=None, cross_bias=None):
    cfg = self.config
    block = f"block_{self.index}"
    normed = RMSNorm(cfg.layer_norm_epsilon, name=f"{block}_self_attention_norm")(hidden)
    hidden = hidden + Attention(cfg, name=f"{block}_self_attention")(normed, normed, bias)
    if self.is_decoder:
      normed = RMSNorm(cfg.layer_norm_epsilon, name=f"{block}_cross_attention_norm")(hidden)
      hidden = hidden + Attention(cfg, name=f"{block}_cross_attention")(
          normed, encoder_hidden, cross_bias)
    normed = RMSNorm(cfg.layer_norm_epsilon, name=f"{block}_mlp_norm")(hidden)
    return hidden + FeedForward(cfg, name=f"{block}_mlp")(normed)


class Stack(nn.Module):
  config: T5Config
  num_layers: int
  is_decoder: bool
  remat: str = ""

  @nn.compact
  def __call__(self, hidden, self_mask, encoder_hidden=None, cross_mask=None):
    cfg = self.config
    length = hidden.shape[1]
    bias = PositionBias(cfg, not self.is_decoder, name="relative_attention_bias")(length, length)
    bias = bias + mask_bias(self_mask)[:, None]
    cross_bias = None if encoder_hidden is None else mask_bias(cross_mask)[:, None]
    block_class = layers.remat(Block, self.remat)
    for i in range(self.num_layers):
      block = block_class(cfg, i, self.is_decoder)
      nn.share_scope(self, block)
      hidden = block(hidden, bias, encoder_hidden, cross_bias)
    return RMSNorm(cfg.layer_norm_epsilon, name="final_norm")(hidden)


def shift_right(labels, start_token_id: int, pad_token_id: int):
  """Decoder inputs from labels, as transformers does (start token first, -100 → pad)."""
  shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start_token_id), labels[:, :-1]], 1)
  return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


class T5(nn.Module):
  """T5ForConditionalGeneration. ``__call__`` returns logits (batch, target_length, vocab);
  ``remat`` as in `optclip.models.gpt_neo.GPTNeo`, per block."""
  config: T5Config
  remat: str = ""

  @nn.compact
  def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
    cfg = self.config
    shared = layers.Embed(cfg.vocab_size, cfg.d_model, name="shared",
                      embedding_init=nn.initializers.normal(cfg.initializer_factor))
    encoder_mask = attention_mask.astype(bool)
    encoded = Stack(cfg, cfg.num_layers, False, self.remat, name="encoder")(
        shared(input_ids), encoder_mask[:, None, :])
    target_length = decoder_input_ids.shape[1]
    causal = jnp.tril(jnp.ones((target_length, target_length), bool))[None]
    if decoder_attention_mask is not None:
      causal = causal & decoder_attention_mask.astype(bool)[:, None, :]
    decoded = Stack(cfg, cfg.num_decoder_layers, True, self.remat, name="decoder")(
        shared(decoder_input_ids), causal, encoded, encoder_mask[:, None, :])
    if cfg.tie_word_embeddings:
      return shared.attend(decoded * cfg.d_model ** -0.5)
    return nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head",
                    kernel_init=nn.initializers.normal(cfg.initializer_factor))(decoded)


def dummy_batch(config: T5Config, batch: int = 1, length: int = 8):
  ids = jnp.ones((batch, length), jnp.int32)
  return {"input_ids": ids, "attention_mask": ids, "labels": ids}


def loss_fn(model: T5, params, batch):
  """Mean token cross-entropy of ``batch['labels']`` (-100 = padding), teacher forced."""
  cfg = model.config
  labels = batch["labels"]
  decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       decoder_input_ids)
  return token_cross_entropy(logits, labels)


def loss_sum(model: T5, params, batch):
  """`loss_fn` before its division by `loss_count` (micro-batching sums these)."""
  return token_loss_sum(logits_fn(model, params, batch), batch["labels"])


def loss_count(model: T5, batch):
  return token_count(batch["labels"])


def logits_fn(model: T5, params, batch):
  cfg = model.config
  decoder_input_ids = shift_right(batch["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     decoder_input_ids)
