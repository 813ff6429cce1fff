"""The claims the report gives a verdict on, and the one format every verdict line takes:
the claim, its source, the verdict, the rule that decided it (fixed before any run) and the
evidence.

Two kinds of claim: the paper's (`Claim`: its own wording and where it says it) and the ones
we test beyond it (`BeyondClaim`: what we expect and the work it comes from), so that a
section beyond the paper cites its source instead of inventing a quote.
"""

from __future__ import annotations

from typing import NamedTuple


class Claim(NamedTuple):
  """A claim of the paper."""
  summary: str
  quote: str  # the paper's wording
  where: str  # its section, table or figure

  def source(self) -> str:
    return f"{self.where}; paper: “{self.quote}”"


class BeyondClaim(NamedTuple):
  """A claim beyond the paper: no quote, the work it comes from instead."""
  summary: str
  citation: str  # e.g. "Zhang et al. 2024, arXiv 2402.16788"

  def source(self) -> str:
    return f"beyond the paper; {self.citation}"


CLAIMS = {
    "quadratic": Claim(
        "clipping lets SGD take a larger step on the introduction's quadratic",
        "if we run adaptive algorithms, signSGD, or simply clip the first coordinate, we can "
        "use a much larger learning rate and converge in a few steps", "Section 1"),
    "adaptive_sharper": Claim(
        "adaptive algorithms have much lower directional sharpness than SGD",
        "the directional sharpness is much lower for adaptive algorithms than for SGD",
        "Section 3.2, Tables 1, 4-7"),
    "clipping_helps": Claim(
        "coordinate-wise clipping almost always lowers directional sharpness",
        "clipping almost always improve the directional sharpness of optimization algorithms",
        "Table 1, Section 4.1"),
    "landscape": Claim(
        "Adam's direction allows a larger one-step loss reduction than SGD's",
        "algorithms with low directional sharpness can generally achieve a better local loss "
        "reduction if optimal step sizes are chosen", "Section 1, Figures 2-4"),
    "top_coordinates": Claim(
        "a small fraction of coordinates carries most of SGD's sharpness",
        "only a small fraction of the coordinates account for most of SGD's directional "
        "sharpness", "Section 1, Figure 1"),
    "gradient_hessian": Claim(
        "|gradient| and |Hessian diagonal| are positively correlated per coordinate",
        "we conjecture that there is a positive correlation between the absolute value of "
        "Hessian coordinates and gradient coordinates", "Section 4.2"),
    "sgd_correlation": Claim(
        "SGD's direction has the best correlation with the gradient",
        "The update step of SGD has the best correlation with the actual gradient",
        "Section 3.2, Appendix C.3"),
    "worst_case": Claim(
        "directional sharpness is below the worst-case sharpness λ_max",
        "Sharpness describes the worst-case directional sharpness and is the supremum of "
        "directional sharpness over all directions", "Section 3.1"),
    "small_fraction": Claim(
        "clipping as little as 0.1% of the coordinates still lowers sharpness, less so",
        "significant but weaker effects can also be observed by setting a very small value "
        "such as 0.1%", "Appendix B.2"),
    "resnet": Claim(
        "for ResNet, adaptive algorithms are NOT much less sharp than SGD",
        "the directional sharpness of adaptive algorithms can be much worse than SGD",
        "Appendix E, Table 9"),
    "smoothness": Claim(
        "removing coordinates with row norm >= 4x mean removes ~1-2.5% of coordinates and "
        "makes the Gauss-Newton norm 2-3x smaller",
        "This removes 1% to 2.5% of the coordinates, and as a consequence the smoothness of "
        "the function is 2 to 3 times better", "Appendix D, Table 8"),
    "convergence": Claim(
        "clipping speeds up convergence", "clipping algorithms can speedup training "
        "significantly", "Section 4.1, Figure 6"),
    "theory": Claim(
        "clipped SGD's directional sharpness is O(sqrt(eps) L + l), far below SGD's ~L",
        "the upper bound on the directional sharpness is at most O(√εL + ℓ) ≪ L compared to "
        "L of SGD", "Theorems 1-2, Appendix A"),
    "rmed": Claim(
        "Adam's trajectory has smaller R_med than SGD's",
        "adaptive methods such as Adam bias the trajectories towards regions where "
        "R^Adam_med is small", "seed 002 (Jiang, Malik & Li)"),
}

class Verdict(NamedTuple):
  """One verdict: its line in the report's Verdicts section is ``str(verdict)``; the summary
  table at the report's top reads the fields."""
  claim: Claim | BeyondClaim
  status: str
  rule: str
  evidence: str
  scope: str = ""
  value: str = ""  # our value, with its interval where there is one
  paper: str = ""  # the paper's value

  def __str__(self) -> str:
    where = f" — {self.scope}" if self.scope else ""
    return (f"{self.claim.summary}{where}: **{self.status}** ({self.claim.source()}). "
            f"Rule: {self.rule}. Evidence: {self.evidence}")

  @property
  def section(self) -> str:
    return getattr(self.claim, "where", "beyond the paper")


class NotRun(NamedTuple):
  """In place of an experiment's verdicts when the preset switched it off."""
  experiment: str
  reason: str  # what switched it off, e.g. "lanczos_iterations=0"
  status: str = "not run"

  def __str__(self) -> str:
    return f"{self.experiment}: **not run** (switched off by {self.reason})"


def verdict(claim: str | Claim | BeyondClaim, status: str, rule: str, evidence: str,
            scope: str = "", *, value: str = "", paper: str = "") -> Verdict:
  """The verdict on a claim of `CLAIMS` (by key) or one a section states itself (a
  `BeyondClaim`, say), with our value and the paper's for the summary table."""
  return Verdict(CLAIMS[claim] if isinstance(claim, str) else claim, status, rule, evidence,
                 scope, value, paper)
