"""Every experiment of the CLI in one place, in the order the report presents them."""

from __future__ import annotations

import dataclasses
from typing import Callable

from experiments import (convergence, histogram, landscape, probing, quadratic, resnet, rmed,
                         sharpness, smoothness, theory)


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  help: str
  run: Callable  # (Context) -> None; measures and logs to metrics.jsonl, resumable
  report: Callable  # (out, records) -> (markdown, verdict lines), or None with nothing to say
  reads: Callable  # record -> bool: the metrics records its report reads
  writes: tuple  # tables/ and figures/ it writes (names; <task>, <trajectory>, <epoch> vary)
  # False where running another experiment already measures everything it reports.
  in_reproduce: bool = True


def _of(experiment: str) -> Callable:
  return lambda record: record["experiment"] == experiment


EXPERIMENTS = (
    Experiment("quadratic", "the introduction's f(x) = xᵀAx example", quadratic.run,
               quadratic.write, _of("quadratic"),
               ("tables/quadratic.md", "figures/quadratic.png")),
    Experiment("sharpness", "Table 1 and Tables 4-7: directional sharpness of every algorithm",
               probing.run_transformer_units, sharpness.write,
               lambda r: probing.is_probe(r, "transformer"),
               ("tables/sharpness_<task>_<trajectory>",)),
    Experiment("landscape", "Figures 2-4, 7-16: loss along every update direction",
               probing.run_transformer_units, landscape.write,
               lambda r: probing.is_probe(r, "transformer"),
               ("tables/landscape_best_reduction",
                "figures/landscape_<task>_<trajectory>_epoch<epoch>[_no_adafactor].png"),
               in_reproduce=False),
    Experiment("histogram", "Figure 1: |update| coordinate histograms, sharpness attribution",
               probing.run_transformer_units, histogram.write,
               lambda r: probing.is_probe(r, "transformer"),
               ("tables/sharpness_attribution", "figures/histogram_<task>_<trajectory>.png"),
               in_reproduce=False),
    Experiment("convergence", "Figure 6 with Table 3's learning rates", convergence.run,
               convergence.write, _of("convergence"),
               ("tables/convergence", "figures/convergence_<task>.png")),
    Experiment("smoothness", "Table 8: Gauss-Newton spectral norm with coordinate removal",
               smoothness.run, smoothness.write, _of("smoothness"), ("tables/smoothness",)),
    Experiment("resnet", "Table 9: directional sharpness on a ResNet", resnet.run,
               resnet.write, probing.is_probe, ("tables/resnet_sharpness",)),
    Experiment("theory", "Theorems 1-2 checked on synthetic quadratics", theory.run,
               theory.write, _of("theory"), ("tables/theory",)),
    Experiment("rmed", "seed 002's R_med along SGD and Adam trajectories",
               probing.run_transformer_units, rmed.write, probing.is_probe, ("tables/rmed",),
               in_reproduce=False),
)

BY_NAME = {e.name: e for e in EXPERIMENTS}
