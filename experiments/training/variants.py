"""An optimizer variant of the paper's tables: a base algorithm and how it clips."""

from __future__ import annotations

import dataclasses
import functools

import optax

import optclip

# The paper's algorithms (Appendix B.2) under the names its tables use. Algorithm 3's SGD
# has an exponential-moving-average momentum (optclip.sgd, like optax.sgd, has none by
# default): momentum = dampening = 0.9. Its sign SGD (Algorithm 5) is signum. Algorithm 9
# (Lion) has no weight decay (optax's and optclip's default is 1e-3), so it is passed as 0.
BASES = {
    "sgd": functools.partial(optclip.sgd, momentum=0.9, dampening=0.9),
    "normalized sgd": optclip.normalized_sgd,
    "sign sgd": optclip.signum,
    "adam": optclip.adam,
    "adafactor": optclip.adafactor,
    "lion": functools.partial(optclip.lion, weight_decay=0.0),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """``base`` with coordinate-wise clipping of the gradient (``clip``) or of the update
  (``clip_update``), as fractions; both None for the plain algorithm."""
  base: str
  clip: float | None = None
  clip_update: float | None = None

  def __post_init__(self):
    if self.base not in BASES:
      raise ValueError(f"Variant: unknown base {self.base!r}; known: {sorted(BASES)}")

  @property
  def label(self) -> str:
    """The name the paper's tables use, e.g. "adam, clip grad 0.5"."""
    if self.clip is not None:
      return f"{self.base}, clip grad {self.clip:g}"
    if self.clip_update is not None:
      return f"{self.base}, clip update {self.clip_update:g}"
    return self.base

  @property
  def clipped(self) -> bool:
    return self.clip is not None or self.clip_update is not None

  @property
  def unclipped(self) -> "Variant":
    return Variant(self.base)

  def _kwargs(self) -> dict:
    kwargs = {}
    if self.clip is not None:
      kwargs["clip"] = self.clip
    if self.clip_update is not None:
      kwargs["clip_update"] = self.clip_update
    return kwargs

  def make(self, learning_rate, *, tunable: bool = False, **options
           ) -> optax.GradientTransformation:
    """The optimizer at ``learning_rate`` (None: Adafactor's relative step size), with
    further keyword ``options`` of its factory (``momentum_start``, say).

    ``tunable=True`` keeps the learning rate in the state (`optax.inject_hyperparams`), so
    one compiled step serves every rate.
    """
    factory, kwargs = BASES[self.base], {**self._kwargs(), **options}
    if learning_rate is None:
      return factory(**kwargs)
    if tunable:
      return optax.inject_hyperparams(factory, static_args=tuple(kwargs))(
          learning_rate=learning_rate, **kwargs)
    return factory(learning_rate, **kwargs)


def by_label(variants) -> dict:
  """{label: Variant}: how the report turns the labels in metrics.jsonl back into variants."""
  return {v.label: v for v in variants}
