"""ResNet in Flax, numerically matching transformers' ResNetForImageClassification.

Basic (ResNet-18/34) and bottleneck (50/101/152) blocks, a 7×7 stride-2 stem with max pooling,
BatchNorm with running statistics. Images are NHWC (channels last, as Flax convolutions want);
the converter transposes HF's NCHW kernels.

BatchNorm: ``loss_fn(model, params, batch)`` uses batch statistics (training mode) and
discards the running-average update, so it is a pure function of ``params`` that the geometry
probes can differentiate. ``train_loss_and_state`` also returns the updated running averages;
``logits_fn`` and ``eval_loss_fn`` use them (evaluation mode, as PyTorch's ``model.eval()``:
the paper's code measures sharpness that way).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from optclip.models.layers import activation, classification_cross_entropy, classification_loss_sum


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  num_channels: int = 3
  embedding_size: int = 64
  hidden_sizes: tuple = (256, 512, 1024, 2048)
  depths: tuple = (3, 8, 36, 3)
  layer_type: str = "bottleneck"  # or "basic"
  hidden_act: str = "relu"
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  num_labels: int = 10
  model_type: str = dataclasses.field(default="resnet", init=False)
  architecture: str = dataclasses.field(default="ResNetForImageClassification", init=False)


def _depths(depth: int) -> tuple:
  return {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}[depth]


PRESETS = {
    "resnet-18": ResNetConfig(hidden_sizes=(64, 128, 256, 512), depths=_depths(18),
                              layer_type="basic"),
    "resnet-34": ResNetConfig(hidden_sizes=(64, 128, 256, 512), depths=_depths(34),
                              layer_type="basic"),
    "resnet-50": ResNetConfig(depths=_depths(50)),
    "resnet-101": ResNetConfig(depths=_depths(101)),
    "resnet-152": ResNetConfig(depths=_depths(152)),
    "resnet-tiny": ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=(8, 16),
                                depths=(1, 1), layer_type="basic"),
    "resnet-tiny-bottleneck": ResNetConfig(num_channels=1, embedding_size=8,
                                           hidden_sizes=(16, 32), depths=(1, 1)),
}


class ConvNorm(nn.Module):
  features: int
  kernel: int = 3
  stride: int = 1
  act: str | None = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), use_bias=False, name="convolution",
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name="normalization")(x)
    return x if self.act is None else activation(self.act)(x)


class Residual(nn.Module):
  config: ResNetConfig
  in_features: int
  features: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.config
    shortcut = x
    if self.in_features != self.features or self.stride != 1:
      shortcut = ConvNorm(self.features, 1, self.stride, None, name="shortcut")(x, train)
    if cfg.layer_type == "basic":
      h = ConvNorm(self.features, 3, self.stride, cfg.hidden_act, name="layer_0")(x, train)
      h = ConvNorm(self.features, 3, 1, None, name="layer_1")(h, train)
    else:
      reduced = self.features // 4
      first, second = ((self.stride, 1) if cfg.downsample_in_bottleneck else (1, self.stride))
      h = ConvNorm(reduced, 1, first, cfg.hidden_act, name="layer_0")(x, train)
      h = ConvNorm(reduced, 3, second, cfg.hidden_act, name="layer_1")(h, train)
      h = ConvNorm(self.features, 1, 1, None, name="layer_2")(h, train)
    return activation(cfg.hidden_act)(h + shortcut)


def max_pool_3x3_stride_2(x):
  """``nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))`` (the embedder's pooling)
  as an elementwise max over the 9 strided views of the padded input: the same values, and
  `jax.experimental.jet` has a rule for ``max`` but none for ``reduce_window_max``."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  height, width = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  views = [padded[:, i:i + 2 * height - 1:2, j:j + 2 * width - 1:2, :]
           for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, views)


class ResNet(nn.Module):
  """ResNetForImageClassification on NHWC images; returns logits (batch, num_labels)."""
  config: ResNetConfig

  @nn.compact
  def __call__(self, pixels, train: bool = False):
    cfg = self.config
    x = ConvNorm(cfg.embedding_size, 7, 2, cfg.hidden_act, name="embedder")(pixels, train)
    x = max_pool_3x3_stride_2(x)
    in_features = cfg.embedding_size
    for s, (features, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
      stride = 2 if (s > 0 or cfg.downsample_in_first_stage) else 1
      for layer in range(depth):
        x = Residual(cfg, in_features, features, stride if layer == 0 else 1,
                     name=f"stage_{s}_layer_{layer}")(x, train)
        in_features = features
    pooled = jnp.mean(x, axis=(1, 2))
    return nn.Dense(cfg.num_labels, name="classifier")(pooled)


def dummy_batch(config: ResNetConfig, batch: int = 2, size: int = 8):
  return {"pixels": jnp.zeros((batch, size, size, config.num_channels), jnp.float32),
          "label": jnp.zeros((batch,), jnp.int32)}


def train_loss_and_state(model: ResNet, params, batch_stats, batch):
  """Training-mode loss (batch statistics) and the updated running averages."""
  variables = {"params": params, "batch_stats": batch_stats}
  logits, updated = model.apply(variables, batch["pixels"], train=True, mutable=["batch_stats"])
  return classification_cross_entropy(logits, batch["label"]), updated["batch_stats"]


def loss_fn(model: ResNet, params, batch):
  """Training-mode loss as a pure function of ``params`` (running averages not needed)."""
  logits, _ = model.apply({"params": params}, batch["pixels"], train=True,
                          mutable=["batch_stats"])
  return classification_cross_entropy(logits, batch["label"])


def logits_fn(model: ResNet, params, batch, batch_stats=None):
  """Evaluation-mode logits with the running averages."""
  return model.apply({"params": params, "batch_stats": batch_stats}, batch["pixels"], train=False)


def eval_loss_fn(model: ResNet, params, batch):
  """Evaluation-mode loss: the running averages come with the batch, as
  ``batch["model_state"]["batch_stats"]`` (so that a compiled probe serves every point of a
  trajectory, whose statistics change)."""
  logits = logits_fn(model, params, batch, batch["model_state"]["batch_stats"])
  return classification_cross_entropy(logits, batch["label"])


def eval_loss_sum(model: ResNet, params, batch):
  """`eval_loss_fn` times the batch size (a sum over examples; the training-mode loss is
  not one: BatchNorm's batch statistics couple the examples)."""
  logits = logits_fn(model, params, batch, batch["model_state"]["batch_stats"])
  return classification_loss_sum(logits, batch["label"])


def loss_count(model: ResNet, batch):
  return batch["label"].shape[0]
