"""The curvature benchmarks' common problem: a GPT-Neo of ours, random token ids, its causal-LM
loss on them, and the same weights in transformers' PyTorch GPT-Neo."""

import os
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import optclip.models as models


class Problem(NamedTuple):
  model: Any
  params: Any
  ids: np.ndarray  # (batch, length) int64 token ids
  loss: Callable  # params -> the causal-LM loss on ``ids``


def gpt_neo(name: str, batch: int, length: int, seed: int = 0) -> Problem:
  model = models.create(name)
  params = models.init_params(model, jax.random.PRNGKey(seed))
  ids = np.random.default_rng(seed).integers(0, model.config.vocab_size,
                                             (batch, length)).astype(np.int64)
  data = {"input_ids": jnp.asarray(ids, jnp.int32),
          "attention_mask": jnp.ones(ids.shape, jnp.int32), "labels": jnp.asarray(ids, jnp.int32)}
  loss_fn = models.make_loss_fn(model)
  return Problem(model, params, ids, lambda p: loss_fn(p, data))


def torch_twin(problem: Problem):
  """transformers' GPTNeoForCausalLM with ``problem``'s weights (through a Hugging Face
  checkpoint), in evaluation mode: no dropout, so both losses are deterministic."""
  import transformers
  folder = os.path.join(tempfile.mkdtemp(), "ckpt")
  models.save_pretrained(folder, problem.model, problem.params)
  torch_model = transformers.GPTNeoForCausalLM.from_pretrained(folder)
  torch_model.eval()
  return torch_model
