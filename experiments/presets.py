"""Every experiment's sizes in one place: smoke (tests), quick (a laptop, ~15-18 min), paper.

The paper's values (seed 000, Appendix B-E): t5-small on opus_books (10240 examples, batch
1024, test batch 1024), GPT-Neo-125M on the-stack-smol (batch 1000), trajectory learning rate
2e-4 for SGD-momentum and Adam, probes at the end of epochs 2, 5, 10, 20, BERT-base on IMDB
with Adam 1e-4 and batch 25 (Table 8), ResNet-152 on CIFAR-10 with batch 1000 (Table 9).
"""

from __future__ import annotations

import dataclasses

from experiments.training.variants import Variant


@dataclasses.dataclass(frozen=True)
class TaskPreset:
  model: str             # a name in optclip.models.PRESETS
  train_size: int        # the fixed training subset
  batch_size: int
  test_size: int         # the fixed test batch the probes use
  max_length: int = 32   # tokens (source/target/block); pixels for images
  vocab_size: int = 512  # tokenizer trained on the training split (ignored for images)
  source: str = "offline"  # "offline" (defaults shipped with the OS/Python) or "paper"
  # Pretraining on the other half of the corpus (0: none; see experiments.tasks.pretraining).
  pretrain_size: int = 0
  pretrain_epochs: int = 0
  pretrain_learning_rate: float = 2e-3
  # The code task's input masking: 0 trains a plain causal LM on raw tokens (the paper's
  # code); 0.15 replaces that share of input tokens by <mask> once (Appendix B.1's text).
  mask_probability: float = 0.0
  # Examples per micro-batch in every program (0: the whole batch in one pass; exact either
  # way, optclip.microbatch; a model with batch statistics, the ResNet, micro-batches only
  # its evaluation-mode probes), and the rematerialisation policy of the reverse-mode programs
  # per transformer block ("" none, "nothing", "dots"; optclip.models.layers.REMAT_POLICIES).
  microbatch_size: int = 0
  remat: str = ""


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  seeds: tuple
  translation: TaskPreset
  code: TaskPreset
  classification: TaskPreset
  images: TaskPreset
  epochs: int                       # trajectory length for the probe experiments
  probe_epochs: tuple               # the paper's 2, 5, 10, 20, scaled
  trajectory_learning_rates: dict   # {"sgd": rate or grid, "adam": ...} (a grid: the pilot)
  landscape_steps: tuple            # step sizes along u/‖u‖
  curvature_samples: int            # coordinates per leaf with exact H_ii (R_med, Section 4.2)
  curvature_at: str                 # take them at "every" probe point or the "last" of a unit
  lanczos_iterations: int           # for λ_max at every probe point (Section 3.1)
  # Figure 6's sweep (experiments.sections.convergence): epochs of the training subset per
  # run, in batches of convergence_batch_size (0: the task's); rates tuned on the tuning
  # seeds (a coarse scan of convergence_coarse_points rates 8x apart, then every 2x around
  # the best), scored on the evaluation seeds; convergence_copies runs per compiled call.
  convergence_epochs: int
  convergence_batch_size: int
  convergence_tuning_seeds: tuple
  convergence_seeds: tuple
  convergence_coarse_points: int
  convergence_copies: int
  smoothness_epochs: int
  smoothness_learning_rate: float
  resnet_epochs: int
  resnet_probe_epochs: tuple
  theory_dim: int
  # Where the probe batch comes from: "train" (a fixed subset of the training subset, as the
  # paper's code; Appendix B.3) or "held-out" (outside it).
  probe_batch: str = "train"
  # (direction, step) pairs of the landscape evaluated by one forward: explicit, so that a
  # CPU plan compiles what an accelerator would run.
  landscape_batch: int = 1
  # The training step also returns every probe's update, so one compiled program serves
  # training and the probe points (saves a compile per task where the 20 stacked updates
  # are small; at the paper's sizes they would crowd the step out).
  fused_probe_step: bool = False
  # Compile the train step once per followed probe (optclip.probes.following's static):
  # the other probes' updates are never formed, only their states advance. Off, one step
  # serves both trajectories and selects the followed update from all of them.
  static_follow: bool = False
  # Probe measurements not to take (names in experiments.probing.measurements), e.g.
  # ("block_sharpness",); the report marks what they feed as not run.
  skip_measurements: tuple = ()
  # Beyond the paper: the SLQ density of every parameter block's Hessian (by kind) at a
  # unit's first probe point, for Zhang et al.'s Jensen-Shannon heterogeneity: Lanczos
  # steps per start vector (0: off) and start vectors.
  block_spectrum_steps: int = 16
  block_spectrum_samples: int = 2
  # Beyond the paper: the probe updates whose directional sharpness is split over parameter
  # blocks (labels; empty: every probe update). A split costs one second derivative per
  # block, so the quick and smoke presets take the four the section's verdict compares.
  block_sharpness_directions: tuple = ()


# What the block split's section compares (and shows first): SGD and Adam, each without and
# with its clip.
BLOCK_SHARPNESS_COMPARED = ("sgd", "sgd, clip grad 0.1", "adam", "adam, clip grad 0.5")


def _steps(low: float, high: float, count: int) -> tuple:
  ratio = (high / low) ** (1 / (count - 1))
  return tuple(float(low * ratio ** i) for i in range(count))


SMOKE = Preset(
    name="smoke", seeds=(0,),
    translation=TaskPreset("t5-micro", train_size=32, batch_size=16, test_size=16,
                           max_length=16, vocab_size=128, pretrain_size=64, pretrain_epochs=1),
    code=TaskPreset("gpt-neo-micro", train_size=32, batch_size=16, test_size=16,
                    max_length=16, vocab_size=128, pretrain_size=64, pretrain_epochs=1),
    classification=TaskPreset("bert-micro", train_size=50, batch_size=25, test_size=25,
                              max_length=16, vocab_size=128, pretrain_size=64,
                              pretrain_epochs=1),
    images=TaskPreset("resnet-tiny", train_size=32, batch_size=16, test_size=16, max_length=8,
                      pretrain_size=32, pretrain_epochs=1),
    epochs=2, probe_epochs=(1, 2), trajectory_learning_rates={"sgd": 1e-2, "adam": 1e-3},
    landscape_steps=(0.0,) + _steps(1e-3, 1.0, 5), curvature_samples=4, curvature_at="last",
    lanczos_iterations=8, fused_probe_step=True, block_spectrum_steps=6,
    block_spectrum_samples=1, block_sharpness_directions=BLOCK_SHARPNESS_COMPARED,
    convergence_epochs=2, convergence_batch_size=8, convergence_tuning_seeds=(100,),
    convergence_seeds=(0,), convergence_coarse_points=5, convergence_copies=5,
    smoothness_epochs=2,
    smoothness_learning_rate=1e-4, resnet_epochs=2, resnet_probe_epochs=(1, 2), theory_dim=200)

QUICK = Preset(
    name="quick", seeds=(0, 1, 2),
    # Sized for ~15 minutes on 2 CPU cores, all experiments x 3 seeds (1054 s measured since
    # a probe point's directions compile as their own program), about a third of it XLA
    # compilation.
    # Pretrained on 4096 examples of the corpus' other half, 4 epochs of Adam (512 steps).
    translation=TaskPreset("t5-mini", train_size=128, batch_size=32, test_size=32,
                           max_length=24, vocab_size=384, pretrain_size=4096,
                           pretrain_epochs=4),
    code=TaskPreset("gpt-neo-mini", train_size=128, batch_size=32, test_size=32,
                    max_length=32, vocab_size=384, pretrain_size=4096, pretrain_epochs=4),
    # BERT and the ResNet are pretrained alike (Table 8 fine-tunes bert-base, Table 9's code
    # an ImageNet ResNet-152): on a half of their data fine-tuning never sees.
    classification=TaskPreset("bert-micro", train_size=250, batch_size=25, test_size=25,
                              max_length=24, vocab_size=384, pretrain_size=2000,
                              pretrain_epochs=2),
    images=TaskPreset("resnet-tiny", train_size=512, batch_size=64, test_size=128,
                      max_length=8, pretrain_size=898, pretrain_epochs=5),
    epochs=20, probe_epochs=(2, 5, 10, 20),
    # Grids: each task's trajectory takes the smallest rate at which its probe-batch loss falls
    # by at least 5% over the 20 epochs from the pretrained start (experiments.probing.pilot;
    # the criterion for "visibly trains" was fixed before any run).
    trajectory_learning_rates={"sgd": (0.03, 0.1, 0.3), "adam": (2e-4, 1e-3)},
    # The Hessian diagonal at a fixed sample of 8 coordinates per leaf at the last probe point
    # (an exact entry costs ~7 ms at t5-mini: every probe point would add ~100 s to the run;
    # the full diagonal of every 2-D leaf, 53K entries, ~6 minutes per probe point).
    landscape_steps=(0.0,) + _steps(1e-3, 10.0, 15), curvature_samples=8, curvature_at="last",
    lanczos_iterations=20, fused_probe_step=True,
    block_sharpness_directions=BLOCK_SHARPNESS_COMPARED,
    # 13 epochs of 16 batches of 8: 208 steps per run (the paper: 20 × 10 = 200); 5 runs per
    # compiled call (a vmapped copy costs as much as a run alone on CPU, so few copies waste
    # least where a stage needs fewer).
    convergence_epochs=13, convergence_batch_size=8, convergence_tuning_seeds=(100, 101),
    convergence_seeds=(0, 1, 2, 3, 4), convergence_coarse_points=10, convergence_copies=5,
    smoothness_epochs=10, smoothness_learning_rate=1e-3, resnet_epochs=10,
    resnet_probe_epochs=(2, 5, 10), theory_dim=1000)

PAPER = Preset(
    name="paper", seeds=(0, 1, 2),
    # Micro-batch sizes and remat chosen with `python -m experiments plan --preset paper
    # --device a100-80gb` (README, "Paper scale"): every program within one 80 GB device.
    translation=TaskPreset("t5-small", train_size=10240, batch_size=1024, test_size=1024,
                           max_length=128, vocab_size=32128, source="paper",
                           microbatch_size=32, remat="dots"),
    code=TaskPreset("gpt-neo-125M", train_size=10000, batch_size=1000, test_size=1024,
                    max_length=256, vocab_size=50257, source="paper", microbatch_size=8,
                    remat="dots"),
    classification=TaskPreset("bert-base", train_size=25000, batch_size=25, test_size=25,
                              max_length=512, vocab_size=30522, source="paper",
                              microbatch_size=5, remat="dots"),
    images=TaskPreset("resnet-152", train_size=50000, batch_size=1000, test_size=1024,
                      max_length=32, source="paper", microbatch_size=8),
    epochs=20, probe_epochs=(2, 5, 10, 20), trajectory_learning_rates={"sgd": 2e-4, "adam": 2e-4},
    static_follow=True,
    # Every exact H_ii is a second-order forward pass over the probe batch (2.7 train steps'
    # FLOPs): 8 per leaf at the last probe point is already ~1000 of them per trajectory
    # (see `python -m experiments plan`).
    landscape_steps=(0.0,) + _steps(1e-4, 10.0, 31), curvature_samples=8, curvature_at="last",
    lanczos_iterations=40,
    convergence_epochs=20, convergence_batch_size=0, convergence_tuning_seeds=(100, 101),
    convergence_seeds=(0, 1, 2, 3, 4), convergence_coarse_points=10, convergence_copies=1,
    smoothness_epochs=10,
    smoothness_learning_rate=1e-4, resnet_epochs=10, resnet_probe_epochs=(2, 5, 10),
    theory_dim=4000)

PRESETS = {p.name: p for p in (SMOKE, QUICK, PAPER)}


def _epochs_within(epochs_field: str):
  return lambda value, preset: (
      None if value and all(isinstance(e, int) and 1 <= e <= getattr(preset, epochs_field)
                            for e in value)
      else f"expected a non-empty tuple of epochs in 1..{epochs_field} "
           f"({getattr(preset, epochs_field)})")


def _at_least(low):
  return lambda value, preset: None if value >= low else f"expected at least {low}"


def _positive_rates(rates) -> bool:
  return bool(rates) and all(isinstance(r, (int, float)) and not isinstance(r, bool)
                             and r > 0 for r in rates)


def _positive(value, preset):
  return None if value > 0 else "expected a positive number"


# What a preset's fields may hold beyond their types: field -> (value, preset) -> a problem
# or None. A value that only switches a measurement off (lanczos_iterations=0, say) is
# allowed; the report marks what it switched off as not run.
def _seeds(value, preset):
  return (None if value and all(isinstance(s, int) and s >= 0 for s in value) else
          "expected a non-empty tuple of non-negative integer seeds")


LIMITS = {
    "seeds": _seeds,
    "epochs": _at_least(1),
    "probe_epochs": _epochs_within("epochs"),
    "trajectory_learning_rates": lambda v, p: (
        None if set(v) == {"sgd", "adam"} and all(
            _positive_rates(r if isinstance(r, (list, tuple)) else (r,)) for r in v.values())
        else "expected a positive rate, or a non-empty grid of them, for exactly 'sgd' and "
             "'adam'"),
    "landscape_steps": lambda v, p: (
        None if v and v[0] == 0 and all(isinstance(s, (int, float)) for s in v) else
        "expected a tuple of step sizes starting at 0.0 (the point itself)"),
    "curvature_samples": _at_least(0),
    "lanczos_iterations": _at_least(0),
    "block_spectrum_steps": _at_least(0),
    "block_spectrum_samples": _at_least(1),
    "convergence_epochs": _at_least(1),
    "convergence_batch_size": _at_least(0),
    "convergence_tuning_seeds": _seeds,
    "convergence_seeds": _seeds,
    "convergence_coarse_points": _at_least(3),
    "convergence_copies": _at_least(1),
    "smoothness_epochs": _at_least(0),
    "smoothness_learning_rate": _positive,
    "resnet_epochs": _at_least(1),
    "resnet_probe_epochs": _epochs_within("resnet_epochs"),
    "theory_dim": _at_least(100),
    "landscape_batch": _at_least(1),
    "block_sharpness_directions": lambda v, p: (
        None if set(v) <= _probe_labels() else
        f"expected probe labels among {sorted(_probe_labels())}"),
    "skip_measurements": lambda v, p: (
        None if set(v) <= _measurement_names() else
        f"expected names among {sorted(_measurement_names())}"),
}


def _probe_labels() -> set:
  from experiments import probing
  return set(probing.KNOWN)


def _measurement_names() -> set:
  from experiments.probing import measurements
  return {m.name for m in measurements.MEASUREMENTS}
TASK_LIMITS = {
    "train_size": _at_least(1),
    "batch_size": lambda v, p: (None if 1 <= v <= p.train_size else
                                f"expected 1..train_size ({p.train_size})"),
    "test_size": lambda v, p: (None if 1 <= v <= p.train_size else
                               f"expected 1..train_size ({p.train_size})"),
    "max_length": _at_least(2),
    "vocab_size": _at_least(8),
    "pretrain_size": _at_least(0),
    "pretrain_epochs": _at_least(0),
    "pretrain_learning_rate": _positive,
    "mask_probability": lambda v, p: None if 0 <= v < 1 else "expected a number in [0, 1)",
    "microbatch_size": lambda v, p: (
        None if v == 0 or (v > 0 and p.batch_size % v == 0 and p.test_size % v == 0) else
        f"expected 0 or a size that divides batch_size ({p.batch_size}) and test_size "
        f"({p.test_size}): one of {_common_divisors(p.batch_size, p.test_size)}"),
    "remat": lambda v, p: None if v in _remat_policies() else
                          f"expected one of {sorted(_remat_policies())}",
}


def _common_divisors(a: int, b: int) -> list:
  return [d for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0]


def _remat_policies() -> dict:
  from optclip.models.layers import REMAT_POLICIES
  return REMAT_POLICIES


def problems(preset: Preset) -> dict:
  """{field (dotted for a task's): what is wrong with its value} for ``preset``."""
  found = {}
  for field, check in LIMITS.items():
    problem = check(getattr(preset, field), preset)
    if problem:
      found[field] = problem
  for task in ("translation", "code", "classification", "images"):
    task_preset = getattr(preset, task)
    for field, check in TASK_LIMITS.items():
      problem = check(getattr(task_preset, field), task_preset)
      if problem:
        found[f"{task}.{field}"] = problem
  return found

# Table 3 of the paper (learning rates of the convergence experiment); None = relative step.
TABLE3_LEARNING_RATES = {
    "translation": {
        Variant("sgd"): 1e-3, Variant("sgd", clip=0.1): 1e-3, Variant("adam"): 2e-3,
        Variant("adam", clip=0.5): 3e-3, Variant("adafactor"): None,
        Variant("adafactor", clip=0.5): 3e-2, Variant("lion"): 2e-3,
        # printed as "2^-3" in the extracted table; 2e-3 is the plausible reading
        Variant("sign sgd"): 2e-3,
        Variant("normalized sgd"): 5e-4, Variant("normalized sgd", clip=0.1): 6e-4},
    "code": {
        Variant("sgd"): 3e-5, Variant("adam"): 1e-4, Variant("adam", clip=0.5): 1.5e-4,
        Variant("adafactor"): 5e-4, Variant("adafactor", clip=0.5): 5e-3,
        Variant("lion"): 2e-4},
}
