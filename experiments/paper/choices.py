"""The protocol's choices, each with what the paper's text says (its section), what the
paper's public code does where that differs (github.com/panyan7/adam-vs-sgd, MIT; file and
line at commit 7270ba4), and what we do — one line each in the report's Choices section."""

from __future__ import annotations

from typing import NamedTuple


class Choice(NamedTuple):
  topic: str
  text: str  # the paper's text, with its section ("silent" where it says nothing)
  code: str  # the paper's code where it differs from the text ("" where it agrees)
  ours: str

  def line(self) -> str:
    code = f" The paper's code: {self.code}." if self.code else ""
    return f"**{self.topic}** ({self.text}).{code} Ours: {self.ours}."


def choices(config: dict) -> list:
  """The report's Choices for the run whose config.json is ``config``."""
  values = config.get("preset_values", {})
  task = lambda name: values.get(name, {})
  pretrained = [f"{name}: {task(name).get('pretrain_size')} examples × "
                f"{task(name).get('pretrain_epochs')} epochs of Adam "
                f"{task(name).get('pretrain_learning_rate')}"
                for name in ("translation", "code", "classification", "images")
                if task(name).get("pretrain_size")]
  rates = values.get("trajectory_learning_rates", {})
  held_out = values.get("probe_batch", "train") != "train"
  masked = task("code").get("mask_probability", 0.0)
  split = values.get("block_sharpness_directions")
  return [Choice(*fields).line() for fields in (
      ("Probe batch", "Appendix B.3 \"Test Batch\", Section 5: a test batch stands in for the "
       "full-batch objective",
       "`random.sample` of the training loader's batches (train_utils.py, `train`)",
       "HELD-OUT examples outside the training subset (not the paper's protocol: the probes "
       "then describe held-out loss)" if held_out else
       "a fixed random subset of the training subset; its indices' hash is in config.json"),
      ("Raw sharpness and the ratios' denominator", "Tables 1, 4-7 report raw values; "
       "Appendix B.3's Eq. 4 re-evaluates a negative one at x + δu/‖u‖, δ = 0.01",
       "the printed ratios divide by |SGD's sharpness| (train_utils.py, `train`: "
       "`v[i] / abs(sharpness_list['sgd'][i])`)",
       "raw values, negative ones included; Eq. 4's value is stored beside every negative "
       "one and used as SGD's denominator only where SGD's raw value is negative, marked ‡"),
      ("SGD momentum start", "Algorithm 3's box: m₀ = 0",
       "the pseudo-optimizer starts at m₁ = g₁ (landscape_utils.py, `SGDParams.update`)",
       "the probes, and the trajectories that follow one, start at m₁ = g₁ as the code; "
       "Figure 6's runs (`optclip.sgd(η, momentum=0.9, dampening=0.9)`) at the box's m₀ = 0"),
      ("Adam's bias correction", "Algorithm 6's box omits it",
       "bias-corrected (landscape_utils.py, `AdamParams.get_update_step`)",
       "bias-corrected, as `optax.adam`"),
      ("Lion's clip update", "Section 4.1: unspecified",
       "clips the interpolation c at its top-50% threshold, without the sign "
       "(landscape_utils.py, `LionParams.update`)",
       "clip(c)/τ_c — the same direction as the code's (sharpness and landscape normalise it)"),
      ("Lion's weight decay", "Algorithm 9 has none", "", "0, passed explicitly"),
      ("Adafactor's momentum", "Algorithms 7-8 have none, though Section 5 says all "
       "algorithms use momentum", "", "none, as the boxes and the code"),
      ("Adafactor on convolution kernels", "Appendix E: silent",
       "factors only 2-D parameters, conv kernels keep a full second moment "
       "(landscape_utils.py, `AdafactorParams`)",
       "HWIO kernels factored over their last two axes (I, O), the spatial axes batched"),
      ("Adafactor at a fixed rate", "Appendix B.2: \"a fixed learning rate in place of α_t\"",
       "the fixed rate is multiplied by max(ε₂, RMS(x)) (torch_optimizer/adafactor.py, "
       "`_get_lr`, `scale_parameter=True`)",
       "multiplied by max(ε₂, RMS(x)) as the code"),
      ("The code task's objective", "Appendix B.1: fixed masks drawn with p = 0.15 at the "
       "start", "a plain causal LM on raw tokens, each document padded with id 0 to 2048 "
       "tokens (tasks/autoregressive.py: inputs and labels are the same tokens)",
       f"{masked:.0%} of input tokens masked once (the text)" if masked else
       "a plain causal LM on raw tokens, as the code; our documents are concatenated and "
       "cut into blocks, so there is no padding to learn"),
      ("Dropout", "silent",
       "on while training (`model.train()` in train_utils.py, `train` and "
       "`train_one_optimizer`), off while measuring (`model.eval()` in landscape_utils.py, "
       "`compute_sharpness` and `search`)",
       "off everywhere: the trajectory steps on the loss the probes measure"),
      ("BatchNorm in the ResNet's probes", "Appendix E: silent",
       "evaluation mode (`model.eval()` in `compute_sharpness`), running statistics",
       "evaluation mode: the running statistics, updated by every training step"),
      ("Pretrained starts", "Table 2 fine-tunes pretrained t5-small and GPT-Neo-125M; "
       "Appendix D.1 a pretrained BERT; Appendix E is silent on the ResNet",
       "binary classification loads distilbert-base-uncased (dataset_utils.py, "
       "`load_model`); the ResNet is torchvision's ImageNet ResNet-152",
       "every model is first trained on a half of its data that fine-tuning never sees ("
       + "; ".join(pretrained) + ")" if pretrained else
       "the --checkpoint folders (or random weights with --random-init)"),
      ("Trajectory learning rates", "Appendix B.3: 2e-4 for both trajectories", "",
       "chosen per task by the pilot's criterion (the smallest rate of the grid whose "
       f"probe-batch loss falls by at least 5% over the trajectory): grids {rates}"
       if any(isinstance(r, (list, tuple)) for r in rates.values()) else
       f"SGD {rates.get('sgd')}, Adam {rates.get('adam')}"),
      ("Gauss-Newton smoothness (Table 8)", "Appendix D: every coordinate whose row norm is "
       ">= 4× the mean is removed",
       "only the attention weight matrices, removed above 2× the mean (hessian_utils.py, "
       "`gauss_newton_hessian`)",
       "both subsets and both thresholds, verdicts on the attention weights at 2× and 4×"),
      ("The convergence runs (Figure 6)", "Appendix B.4: \"we manually tune the learning "
       "rate\"; Table 3's rates",
       "fixed rates (algorithm_list.py, lines 62-73), SGD without momentum (`optim.SGD`'s "
       "default), and the clipped optimizers built without `foreach`: `SGDClip`, `AdamClip` "
       "and `NormalizedSGD` then fall back to their single-tensor path "
       "(torch_optimizer/sgd_clip.py line 247 `foreach = False`, line 255 "
       "`func = _single_tensor_sgd`; adam_clip.py lines 259 and 267; normalized_sgd.py "
       "likewise), which never clips (the clip is in `_multi_tensor_sgd`, sgd_clip.py line "
       "331, and `_multi_tensor_adam`, adam_clip.py line 404) and, for normalized SGD, never "
       "normalises either; only Adafactor's `step` clips",
       "every pair tuned alike on a rate lattice and scored on held-out seeds "
       "(experiments.sections.convergence), with Algorithm 3's momentum 0.9"),
      ("R_med and Section 4.2's correlation", "seed 002: silent on how H_ii is sampled",
       "a 1e-4 fraction of the attention weights' entries (hessian_utils.py, "
       "`sample_hessian`)",
       f"exact H_ii at a fixed random sample of {values.get('curvature_samples')} coordinates "
       f"per leaf, at "
       + ("every probe point" if values.get("curvature_at") == "every" else
          "the last probe point of every trajectory")),
      ("λ_max", "Section 3.1", "", f"Lanczos with {values.get('lanczos_iterations')} "
       "iterations (it can only underestimate the supremum)"),
      ("Clipping", "Section 4.1: the top k% coordinates clipped to the k-th largest |g|",
       "k = ⌊fraction·n⌋ + 1 (the threshold is the sorted |g| at index ⌊fraction·n⌋) and "
       "a fraction of 1 zeroes the gradient (`clip_top_coordinates`)",
       "one threshold over all parameters, k = ⌈fraction·n⌉, ties at τ clipped to τ; at 100% "
       "every coordinate is clipped to the smallest |g|"),
      ("Block split of directional sharpness (beyond the paper)", "silent: Section 4 "
       "attributes sharpness to the top coordinates, not to named blocks", "",
       "u_bᵀHu_b/‖u‖² per parameter kind for "
       + (f"the probe updates {'; '.join(split)}" if split else "every probe update")
       + " at every probe point"),
  )]
