"""optclip: coordinate-wise clipping, the Pan & Li (2023) optimizer family and geometry probes.

Top level: clipping (`coord_clip`, `clip_threshold`, `clip_to_threshold`), the optimizers
(Algorithms 3-9) and the probes a user reaches for first (`directional_sharpness`,
`gradient_correlation`, `landscape`). The rest lives in its module, as in ``optax.tree``:
`optclip.geometry`, `optclip.curvature`, `optclip.probes`, `optclip.sharding`,
`optclip.models`, `optclip.data`.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from optclip import curvature, geometry, probes, sharding
from optclip.clipping import (CoordClipState, clip_states, clip_threshold, clip_to_threshold,
                              coord_clip)
from optclip.geometry import directional_sharpness, gradient_correlation, landscape
from optclip.optimizers import (adafactor, adam, lion, normalized_sgd, scale_by_clipped_adafactor,
                                scale_by_clipped_adam, scale_by_clipped_lion,
                                scale_by_damped_trace, scale_by_frobenius_normalization, sgd,
                                sign_sgd, signum)

__version__ = "0.1.0"

# optclip.models needs flax and optclip.data needs datasets/tokenizers (the "models" and
# "data" extras): imported on first use, so `import optclip` needs only the core.
_LAZY = ("data", "models")


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module = importlib.import_module(f"optclip.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'optclip' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "CoordClipState",
    "adafactor",
    "adam",
    "clip_states",
    "clip_threshold",
    "clip_to_threshold",
    "coord_clip",
    "curvature",
    "directional_sharpness",
    "geometry",
    "gradient_correlation",
    "landscape",
    "lion",
    "normalized_sgd",
    "probes",
    "scale_by_clipped_adafactor",
    "scale_by_clipped_adam",
    "scale_by_clipped_lion",
    "scale_by_damped_trace",
    "scale_by_frobenius_normalization",
    "sgd",
    "sharding",
    "sign_sgd",
    "signum",
]
