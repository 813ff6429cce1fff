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
from optclip.curvature import (GaussNewtonSmoothness, gauss_newton_spectral_norm,
                               hessian_diagonal, hessian_vector_product, r_med,
                               top_hessian_eigenvalue)
from optclip.geometry import (GradientCorrelation, RobustSharpness, TaylorTerms,
                              coordinate_histogram, directional_sharpness, gradient_correlation,
                              landscape, plot_coordinate_histograms, sharpness_attribution,
                              taylor_decomposition, tree_dot, tree_norm)
from optclip.probes import (ProbePoint, init_pseudo_updates, pseudo_updates,
                            step_pseudo_updates, train_with_probes)
