"""optclip: coordinate-wise clipping, the Pan & Li (2023) optimizer family and geometry probes.

References:
  Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers, 2023
  (arXiv 2306.00204).
"""

from optclip.clipping import CoordClipState, clip_threshold, clip_to_threshold, coord_clip

__version__ = "0.1.0"
from optclip.optimizers import (adafactor, adam, lion, normalized_sgd,
                                scale_by_clipped_adafactor, scale_by_clipped_adam,
                                scale_by_clipped_lion, scale_by_frobenius_normalization, sgd,
                                sign_sgd)
