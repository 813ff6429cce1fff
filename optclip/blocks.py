"""Block partitions of a parameter tree by leaf path: which block (layer, kind of weight) every
leaf belongs to, for block-wise curvature (Hessian block spectra, block-wise sharpness).

    labels = optclip.blocks.partition(params)                  # {"...": "mlp", ...}
    labels = optclip.blocks.partition(params, by="layer/kind") # "encoder/block_0/query/key"
    labels = optclip.blocks.partition(params, rules=[(r"attention", "attention")])

A block is a set of whole leaves. The default rules know the leaf names of optclip's T5,
GPT-Neo, BERT and ResNet and of the common Flax and Hugging Face layouts: kinds
``embedding``, ``query/key``, ``value/output``, ``mlp``, ``norm``, ``head``,
``convolution`` (else ``other``); layers ``encoder/block_3``, ``h_7``, ``layer_2``,
``stage_1_layer_0`` (else ``global``).

References:
  Zhang et al., Why Transformers Need Adam: A Hessian Perspective, 2024 (arXiv 2402.16788):
  the block-diagonal Hessian's blocks by layer and kind.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

__all__ = ["KIND_RULES", "block_names", "kind", "layer", "leaf_path", "partition", "select"]

# (pattern on one path component, kind); the first rule that matches any component wins, the
# rules tried in order.
KIND_RULES = (
    (r"norm|^ln_", "norm"),
    (r"embed|^shared$|^wte$|^wpe$|relative_attention_bias", "embedding"),
    (r"^lm_head$|^classifier$|^pooler$|^head$", "head"),
    (r"^(q|k|q_proj|k_proj|query|key)$", "query/key"),
    (r"^(v|o|v_proj|out_proj|value|attention_output|out)$", "value/output"),
    (r"mlp|^wi(_\d+)?$|^wo$|^c_fc$|^c_proj$|^intermediate$|^output$|^dense", "mlp"),
    (r"conv|shortcut", "convolution"),
)
# A layer's name starts a path component (so "patch_2" is not layer "h_2").
_LAYER = re.compile(r"(?:^|/)(?:(encoder|decoder)/)?(block_\d+|h_\d+|layer_\d+|"
                    r"stage_\d+_layer_\d+|layers_\d+)")
BY = ("kind", "layer", "layer/kind")


def leaf_path(path) -> str:
  """A key path (`jax.tree_util.tree_flatten_with_path`) as "a/b/c"."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def kind(path: str, rules: Sequence[tuple[str, str]] = KIND_RULES) -> str:
  """The kind of the leaf at ``path`` ("a/b/c"): the first rule matching a component."""
  components = path.lower().split("/")
  for pattern, kind in rules:
    if any(re.search(pattern, component) for component in components):
      return kind
  return "other"


def layer(path: str) -> str:
  """The layer of the leaf at ``path`` ("encoder/block_0", "h_3", ...), or "global"."""
  match = _LAYER.search(path)
  if match is None:
    return "global"
  stack, layer = match.groups()
  layer = re.match(r"(block|h|layer|layers)_\d+|stage_\d+_layer_\d+", layer).group(0)
  return f"{stack}/{layer}" if stack else layer


def partition(params: Any, *, by: str = "kind",
              rules: Sequence[tuple[str, str]] | Callable[[str, Any], str] | None = None) -> Any:
  """The block label of every leaf of ``params``, as a pytree of strings shaped like it.

  Args:
    params: a parameter pytree (Flax variables' ``params``, any nested dicts).
    by: ``"kind"`` (embedding, query/key, value/output, mlp, norm, head, convolution,
      other), ``"layer"`` (encoder/block_0, h_3, ..., or global) or ``"layer/kind"``.
    rules: your own ``(regex, kind)`` pairs, tried in order on each path component before
      the defaults, or a function ``(path, leaf) -> label`` that replaces them (``by`` is
      then ignored).

  Returns:
    A pytree like ``params`` of labels.

  Example:
    >>> import jax.numpy as jnp
    >>> from optclip import blocks
    >>> params = {"h_0": {"q_proj": {"kernel": jnp.ones((2, 2))},
    ...                   "ln_1": {"scale": jnp.ones(2)}}, "wte": {"embedding": jnp.ones((3, 2))}}
    >>> blocks.partition(params, by="layer/kind")
    {'h_0': {'ln_1': {'scale': 'h_0/norm'}, 'q_proj': {'kernel': 'h_0/query/key'}}, 'wte': {'embedding': 'global/embedding'}}
  """
  if by not in BY:
    raise ValueError(f"partition: by must be one of {BY}, got {by!r}")
  custom = callable(rules)
  kind_rules = tuple(() if rules is None or custom else rules) + KIND_RULES

  def label(path, leaf):
    text = leaf_path(path)
    if custom:
      return str(rules(text, leaf))
    leaf_kind, leaf_layer = kind(text, kind_rules), layer(text)
    return {"kind": leaf_kind, "layer": leaf_layer, "layer/kind": f"{leaf_layer}/{leaf_kind}"}[by]

  return jax.tree_util.tree_map_with_path(label, params)


def block_names(labels: Any) -> list:
  """The distinct labels of a `partition`, in leaf order of first appearance."""
  return list(dict.fromkeys(jax.tree.leaves(labels)))


def select(tree: Any, labels: Any, name: str) -> Any:
  """``tree`` with every leaf outside block ``name`` replaced by zeros (u_b of a direction u).

  ``labels`` may have the structure of ``tree`` or be a prefix of it (as a `partition` of
  parameters is for a tree of stacked directions).
  """
  return jax.tree.map(lambda label, x: x if label == name else jax.numpy.zeros_like(x),
                      labels, tree)
