"""Every experiment of the CLI, in the order the report presents them: each section module
declares its own `experiments.setup.experiment.Experiment`."""

from __future__ import annotations

from experiments.sections import (ablation, block_sharpness, block_spectra, convergence,
                                  correlation, histogram, landscape, losses, mechanism,
                                  preconditioned, quadratic, resnet, rmed, scaling, sharpness,
                                  smoothness, theory, worstcase)

SECTIONS = (quadratic, losses, sharpness, correlation, landscape, histogram, mechanism,
            worstcase, ablation, convergence, smoothness, resnet, theory, rmed,
            block_sharpness, block_spectra, preconditioned, scaling)
EXPERIMENTS = tuple(section.EXPERIMENT for section in SECTIONS)
BY_NAME = {e.name: e for e in EXPERIMENTS}
