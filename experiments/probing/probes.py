"""The probe optimizers of every trajectory (Tables 1, 4-7 and 9, the clip ablation, the scale
trend) and the transformation a trajectory trains with (`optclip.probes.following`)."""

from __future__ import annotations

from experiments.training.variants import Variant
from optclip import probes

# Clip-fraction ablation: 0.1% (Appendix B.2's "very small value") up to 100%, for SGD and
# Adam (the paper's 10% and 50% among them; Section 4.1: "larger thresholds for Adam").
CLIP_ABLATION = (0.001, 0.01, 0.1, 0.5, 1.0)
# The SGD-family optimizers start their momentum at the first gradient, as the paper's code
# does (m₁ = g₁; Algorithm 3's box would start at 0); the SGD trajectory follows the SGD probe.
PROBE_MOMENTUM_START = "gradient"
SGD_FAMILY = ("sgd", "normalized sgd", "sign sgd")

# The algorithms of Tables 1 and 4-7 (transformer) and Table 9 (resnet; it clips Adam and
# Adafactor at 10%).
PAPER_PROBES = {
    "transformer": (
        Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"), Variant("adam", clip=0.5),
        Variant("adam", clip_update=0.5), Variant("adafactor"), Variant("adafactor", clip=0.5),
        Variant("lion"), Variant("lion", clip_update=0.5), Variant("sign sgd"),
        Variant("normalized sgd"), Variant("normalized sgd", clip=0.1)),
    "resnet": (
        Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"), Variant("adam", clip=0.1),
        Variant("adafactor"), Variant("adafactor", clip=0.1), Variant("lion"),
        Variant("sign sgd"), Variant("normalized sgd"), Variant("normalized sgd", clip=0.1)),
}
ABLATION = tuple(Variant(base, clip=f) for base in ("sgd", "adam") for f in CLIP_ABLATION
                 if Variant(base, clip=f) not in PAPER_PROBES["transformer"])
# The scale trend measures only what its figure shows (experiments.sections.scaling).
PAPER_PROBES["scaling"] = (Variant("sgd"), Variant("sgd", clip=0.1), Variant("adam"),
                           Variant("adam", clip=0.5))
PROBES = {"transformer": PAPER_PROBES["transformer"] + ABLATION,
          "resnet": PAPER_PROBES["resnet"], "scaling": PAPER_PROBES["scaling"]}
TRAJECTORIES = ("sgd", "adam")


def probe_optimizers(kind: str = "transformer") -> dict:
  """{label: optimizer} with unit learning rates: only the direction of an update matters to
  the probes (sharpness and landscape normalise it), and a trajectory scales its own.
  Adafactor keeps its relative step size, which scales each leaf by its RMS and so is part
  of its direction."""
  def make(v):
    if v.base == "adafactor":
      return v.make(None)
    if v.base in SGD_FAMILY:
      return v.make(1.0, momentum_start=PROBE_MOMENTUM_START)
    return v.make(1.0)
  return {v.label: make(v) for v in PROBES[kind]}


def train_transform(trajectory: str, learning_rate: float, kind: str, *, static=False):
  """Training along the ``trajectory`` probe at ``learning_rate``, every probe following
  (``static``: see `optclip.probes.following`)."""
  return probes.following(probe_optimizers(kind), trajectory, learning_rate, static=static)
