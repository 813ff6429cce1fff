"""Every experiment of the CLI in one place, in the order the report presents them."""

from __future__ import annotations

import dataclasses
from typing import Callable

from experiments import (ablation, convergence, correlation, histogram, landscape, losses,
                         mechanism, probing, quadratic, resnet, rmed, scaling, sharpness,
                         smoothness, theory, worstcase)


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  help: str
  run: Callable  # (Context) -> None; measures and logs to metrics.jsonl, resumable
  report: Callable  # (out, records) -> (markdown, verdict lines), or None with nothing to say
  reads: Callable  # record -> bool: the metrics records its report reads
  writes: tuple  # tables/ and figures/ it writes (names; <task>, <trajectory>, <epoch> vary)
  tasks: tuple = ()  # the tasks its run builds (preflight builds them first)
  # False where running another experiment already measures everything it reports.
  in_reproduce: bool = True


def _of(experiment: str) -> Callable:
  return lambda record: record["experiment"] == experiment


def _transformer_probes(record) -> bool:
  return probing.is_probe(record, "transformer")


def _from_units(name, help_text, report, reads, writes) -> Experiment:
  """An experiment that reports on the transformer trajectory units (which `sharpness`
  runs), so `reproduce` need not run it again."""
  return Experiment(name, help_text, probing.run_transformer_units, report, reads, writes,
                    probing.TRANSFORMER_TASKS, in_reproduce=False)


EXPERIMENTS = (
    Experiment("quadratic", "the introduction's f(x) = xᵀAx example", quadratic.run,
               quadratic.write, _of("quadratic"),
               ("tables/quadratic.md", "figures/quadratic.png")),
    _from_units("losses", "the trajectories' probe-batch losses at every probe point",
                losses.write, probing.is_trajectory, ("tables/trajectory_losses",)),
    Experiment("sharpness", "Table 1 and Tables 4-7: directional sharpness of every algorithm",
               probing.run_transformer_units, sharpness.write, _transformer_probes,
               ("tables/table1", "tables/sharpness_<task>_<trajectory>"),
               probing.TRANSFORMER_TASKS),
    _from_units("correlation", "Eq. 1's gradient correlation; Appendix C.3's trade-off",
                correlation.write, _transformer_probes,
                ("tables/gradient_correlation", "figures/tradeoff_<task>_<trajectory>.png")),
    _from_units("landscape", "Figures 2-4, 7-16: loss along every update direction",
                landscape.write, _transformer_probes,
                ("tables/landscape_best_reduction",
                 "figures/landscape_<task>_<trajectory>_epoch<epoch>[_no_adafactor].png")),
    _from_units("histogram", "Figure 1: |update| coordinate histograms, sharpness attribution",
                histogram.write, _transformer_probes,
                ("tables/sharpness_attribution", "figures/histogram_<task>_<trajectory>.png")),
    _from_units("mechanism", "Section 4.2: |gradient| vs |Hessian diagonal| per coordinate",
                mechanism.write, _transformer_probes,
                ("tables/gradient_hessian_correlation[_per_layer]",
                 "figures/gradient_vs_hessian_diagonal.png")),
    _from_units("worstcase", "Section 3.1: λ_max beside every directional sharpness",
                worstcase.write, _transformer_probes, ("tables/worst_case_sharpness",)),
    _from_units("ablation", "clip fractions 0.1%-100% for SGD and Adam", ablation.write,
                _transformer_probes, ("tables/clip_ablation",)),
    Experiment("convergence", "Figure 6 with Table 3's learning rates", convergence.run,
               convergence.write, _of("convergence"),
               ("tables/convergence", "figures/convergence_<task>.png"),
               probing.TRANSFORMER_TASKS),
    Experiment("smoothness", "Table 8: Gauss-Newton spectral norm with coordinate removal",
               smoothness.run, smoothness.write, _of("smoothness"), ("tables/smoothness",),
               ("classification",)),
    Experiment("resnet", "Table 9: directional sharpness on a ResNet", resnet.run,
               resnet.write, probing.is_probe, ("tables/resnet_sharpness",), ("images",)),
    Experiment("theory", "Theorem 2 checked in full on non-diagonal quadratics", theory.run,
               theory.write, _of("theory"), ("tables/theory",)),
    _from_units("rmed", "seed 002's R_med along SGD and Adam trajectories", rmed.write,
                probing.is_probe, ("tables/rmed", "tables/rmed_per_layer")),
    Experiment("scaling", "beyond the paper: sharpness ratios over three model sizes "
               "(its own command, not part of reproduce)", scaling.run, scaling.write,
               lambda r: probing.is_probe(r, scaling.KIND), ("tables/scaling",
                                                             "figures/scaling.png"),
               probing.TRANSFORMER_TASKS, in_reproduce=False),
)

BY_NAME = {e.name: e for e in EXPERIMENTS}
