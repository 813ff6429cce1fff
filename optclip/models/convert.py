"""Hugging Face checkpoint folders ↔ our Flax parameters, without the hub and without Flax
classes from transformers.

The tensor names are derived from our own parameter tree (one naming function per family),
so loading and saving use the same table and cannot drift apart. Kernels are transposed
(Linear: (out, in) ↔ (in, out); Conv: OIHW ↔ HWIO); everything else is copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
from flax import traverse_util

from optclip.models import bert, gpt_neo, resnet, t5

FAMILIES = {
    "t5": (t5.T5Config, t5.T5, t5),
    "gpt_neo": (gpt_neo.GPTNeoConfig, gpt_neo.GPTNeo, gpt_neo),
    "bert": (bert.BertConfig, bert.BertClassifier, bert),
    "resnet": (resnet.ResNetConfig, resnet.ResNet, resnet),
}

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be read into (or written from) our models."""


# --- names ----------------------------------------------------------------------------------

def _t5_name(path, config) -> str:
  stack, module = path[0], path[1] if len(path) > 1 else None
  leaf = _LEAF_NAMES[path[-1]]
  if stack == "shared":
    return "shared.weight"
  if stack == "lm_head":
    return "lm_head.weight"
  if module == "relative_attention_bias":
    return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  if module == "final_norm":
    return f"{stack}.final_layer_norm.weight"
  i, part = re.fullmatch(r"block_(\d+)_(.+)", module).groups()
  mlp_layer = 2 if stack == "decoder" else 1
  layer, hf_module = {
      "self_attention": (0, "SelfAttention"), "self_attention_norm": (0, "layer_norm"),
      "cross_attention": (1, "EncDecAttention"), "cross_attention_norm": (1, "layer_norm"),
      "mlp": (mlp_layer, "DenseReluDense"), "mlp_norm": (mlp_layer, "layer_norm"),
  }[part]
  inner = f".{path[2]}" if len(path) > 3 else ""
  return f"{stack}.block.{i}.layer.{layer}.{hf_module}{inner}.{leaf}"


def _gpt_neo_name(path, config) -> str:
  leaf = _LEAF_NAMES[path[-1]]
  if path[0] == "lm_head":
    return "lm_head.weight"
  match = re.fullmatch(r"h_(\d+)", path[0])
  if match is None:
    return f"transformer.{path[0]}.{leaf}"
  prefix = f"transformer.h.{match.group(1)}"
  module = path[1]
  if module in ("q_proj", "k_proj", "v_proj", "out_proj"):
    return f"{prefix}.attn.attention.{module}.{leaf}"
  if module in ("c_fc", "c_proj"):
    return f"{prefix}.mlp.{module}.{leaf}"
  return f"{prefix}.{module}.{leaf}"


def _bert_name(path, config) -> str:
  leaf = _LEAF_NAMES[path[-1]]
  top = path[0]
  if top in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    return f"bert.embeddings.{top}.{leaf}"
  if top == "embeddings_norm":
    return f"bert.embeddings.LayerNorm.{leaf}"
  if top == "pooler":
    return f"bert.pooler.dense.{leaf}"
  if top == "classifier":
    return f"classifier.{leaf}"
  i = re.fullmatch(r"layer_(\d+)", top).group(1)
  module = {"query": "attention.self.query", "key": "attention.self.key",
            "value": "attention.self.value", "attention_output": "attention.output.dense",
            "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
            "output": "output.dense", "output_norm": "output.LayerNorm"}[path[1]]
  return f"bert.encoder.layer.{i}.{module}.{leaf}"


def _resnet_name(path, config) -> str:
  leaf = _LEAF_NAMES[path[-1]]
  if path[0] == "classifier":
    return f"classifier.1.{leaf}"
  if path[0] == "embedder":
    return f"resnet.embedder.embedder.{path[1]}.{leaf}"
  s, l = re.fullmatch(r"stage_(\d+)_layer_(\d+)", path[0]).groups()
  prefix = f"resnet.encoder.stages.{s}.layers.{l}"
  if path[1] == "shortcut":
    return f"{prefix}.shortcut.{path[2]}.{leaf}"
  m = re.fullmatch(r"layer_(\d+)", path[1]).group(1)
  return f"{prefix}.layer.{m}.{path[2]}.{leaf}"


_NAMERS = {"t5": _t5_name, "gpt_neo": _gpt_neo_name, "bert": _bert_name,
           "resnet": _resnet_name}

# Older checkpoints spell some tensors differently.
_ALIASES = [(re.compile(r"LayerNorm\.weight$"), "LayerNorm.gamma"),
            (re.compile(r"LayerNorm\.bias$"), "LayerNorm.beta"),
            (re.compile(r"^shared\.weight$"), "encoder.embed_tokens.weight")]


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  return array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  return array


# --- configs --------------------------------------------------------------------------------

def config_from_hf(hf_config: dict, source: str = "config.json"):
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; "
                          f"known: {sorted(FAMILIES)}")
  config_cls = FAMILIES[model_type][0]
  fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
  values = {k: v for k, v in hf_config.items() if k in fields}
  if "num_labels" in fields and "num_labels" not in values:
    # save_pretrained drops id2label when it holds transformers' default of 2 labels
    # (PretrainedConfig), so an absent one means 2, not this family's own default.
    values["num_labels"] = len(hf_config["id2label"]) if hf_config.get("id2label") else 2
  if model_type == "t5" and values.get("num_decoder_layers") is None:
    values["num_decoder_layers"] = hf_config.get("num_layers", t5.T5Config.num_layers)
  if model_type == "gpt_neo" and "attention_types" in values:
    values["attention_types"] = tuple((tuple(kinds), int(n))
                                      for kinds, n in values["attention_types"])
  for key in ("hidden_sizes", "depths"):
    if key in values:
      values[key] = tuple(values[key])
  return config_cls(**values)


def config_to_hf(config) -> dict:
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
  out["model_type"] = config.model_type
  out["architectures"] = [config.architecture]
  if config.model_type == "gpt_neo":
    out["attention_types"] = [[list(kinds), n] for kinds, n in config.attention_types]
    out["attention_layers"] = config.attention_layers
    out["num_layers"] = len(config.attention_layers)
  if config.model_type in ("bert", "resnet"):
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  return json.loads(json.dumps(out))  # tuples → lists


# --- weights --------------------------------------------------------------------------------

def _read_safetensors(file: str) -> dict:
  from safetensors import safe_open
  with safe_open(file, framework="flax") as handle:
    return {name: (np.asarray(handle.get_tensor(name)), file) for name in handle.keys()}


def read_state_dict(folder: str) -> dict:
  """{tensor name: (numpy array, file it came from)} from a HF checkpoint folder."""
  single = os.path.join(folder, "model.safetensors")
  index = os.path.join(folder, "model.safetensors.index.json")
  torch_file = os.path.join(folder, "pytorch_model.bin")
  if os.path.exists(single):
    return _read_safetensors(single)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{index} lists {name}, but {path} does not exist")
      tensors.update(_read_safetensors(path))
    return tensors
  if os.path.exists(torch_file):
    try:
      import torch
    except ImportError as error:
      raise CheckpointError(f"{torch_file} is a PyTorch pickle and torch is not installed; "
                            "install torch==2.13.0 or convert the folder to safetensors") from error
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return {k: (v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy(),
                torch_file) for k, v in state.items()}
  raise CheckpointError(f"{folder} has no weights: expected model.safetensors, "
                        "model.safetensors.index.json or pytorch_model.bin")


def init_variables(model, key):
  """``model.init`` with the family's dummy inputs: all Flax collections of a fresh model."""
  config = model.config
  batch = FAMILIES[config.model_type][2].dummy_batch(config)
  if config.model_type == "resnet":
    return model.init(key, batch["pixels"], train=False)
  if config.model_type == "t5":
    return model.init(key, batch["input_ids"], batch["attention_mask"], batch["labels"])
  return model.init(key, batch["input_ids"])


def _abstract_variables(model, config):
  return jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))


def load_pretrained(folder: str, *, dtype=None, with_state: bool = False):
  """Loads a local HF checkpoint folder (config.json + safetensors or pytorch_model.bin).

  Args:
    folder: the checkpoint folder; never a hub name (nothing is downloaded).
    dtype: optional dtype for floating parameters (default: as stored).
    with_state: also return the non-trainable collections ({'batch_stats': ...} for ResNet,
      {} otherwise).

  Returns:
    ``(model, params)`` or ``(model, params, state)``; ``model.config`` is our config dataclass.
  """
  if not os.path.isdir(folder):
    raise CheckpointError(f"checkpoint folder {folder!r} does not exist (optclip never "
                          "downloads; pass a local folder written by save_pretrained)")
  config_file = os.path.join(folder, "config.json")
  if not os.path.exists(config_file):
    raise CheckpointError(f"{config_file} is missing")
  with open(config_file) as f:
    config = config_from_hf(json.load(f), config_file)
  model = FAMILIES[config.model_type][1](config)
  abstract = _abstract_variables(model, config)
  tensors = read_state_dict(folder)
  namer = _NAMERS[config.model_type]
  variables = {}
  for collection, tree in abstract.items():
    flat = {}
    for path, spec in traverse_util.flatten_dict(tree).items():
      name = namer(path, config)
      found = name if name in tensors else next(
          (name[:m.start()] + alias for pattern, alias in _ALIASES
           if (m := pattern.search(name)) and name[:m.start()] + alias in tensors), None)
      if found is None:
        raise CheckpointError(f"{folder}: no tensor {name!r} in the weights (needed for "
                              f"{collection}/{'/'.join(path)})")
      array, file = tensors[found]
      value = _to_flax(array, path[-1])
      if tuple(value.shape) != tuple(spec.shape):
        raise CheckpointError(f"{file}: tensor {found!r} has shape {tuple(array.shape)}, "
                              f"the config needs {tuple(_to_torch(np.empty(spec.shape), path[-1]).shape)}")
      target = dtype if (dtype is not None and np.issubdtype(spec.dtype, np.floating)) else spec.dtype
      flat[path] = jax.numpy.asarray(value, dtype=target)
    variables[collection] = traverse_util.unflatten_dict(flat)
  params = variables.pop("params")
  return (model, params, variables) if with_state else (model, params)


def save_pretrained(folder: str, model, params, state: dict | None = None) -> None:
  """Writes config.json + model.safetensors that transformers' PyTorch classes load.

  Refuses to overwrite an existing checkpoint in ``folder``.
  """
  from safetensors.numpy import save_file
  config = model.config
  os.makedirs(folder, exist_ok=True)
  weights = os.path.join(folder, "model.safetensors")
  if os.path.exists(weights):
    raise CheckpointError(f"{weights} exists; refusing to overwrite a checkpoint")
  namer = _NAMERS[config.model_type]
  collections = {"params": params, **(state or {})}
  tensors = {}
  for tree in collections.values():
    for path, value in traverse_util.flatten_dict(jax.device_get(tree)).items():
      array = np.asarray(value)
      if array.dtype not in (np.float32, np.float16, np.float64):
        array = array.astype(np.float32)
      tensors[namer(path, config)] = np.ascontiguousarray(_to_torch(array, path[-1]))
  if config.model_type == "resnet":
    for name in [n for n in tensors if n.endswith("running_mean")]:
      tensors[name[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  tmp = weights + ".tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  os.replace(tmp, weights)
