"""Every check that can fail, run before the first experiment starts and before the run
folder is touched: checkpoint folders, data folders and their sizes, the mesh against the
devices, free disk for checkpoints. A failure is a `UsageError` (exit 2, nothing written)."""

from __future__ import annotations

import os
import shutil

from experiments.errors import UsageError

# The models the paper fine-tunes (Table 2, Appendix D.1), as its code loads them, and how
# to save each as a local folder on a machine with internet.
PAPER_CHECKPOINTS = {
    "translation": ("t5-small", "AutoModelForSeq2SeqLM", ""),
    "code": ("flax-community/gpt-neo-125M-code-clippy", "AutoModelForCausalLM", ""),
    "classification": ("bert-base-uncased", "AutoModelForSequenceClassification",
                       ", num_labels=2"),
    # The paper's code takes torchvision's ImageNet ResNet-152; this is the Hugging Face one
    # (also ImageNet-trained), whose 1000-class head the task replaces.
    "images": ("microsoft/resnet-152", "AutoModelForImageClassification", ""),
}


def save_command(task: str) -> str:
  name, cls, extra = PAPER_CHECKPOINTS[task]
  folder = f"CKPT/{name.split('/')[-1]}"
  tokenizer = ("" if task == "images" else
               f"; t.AutoTokenizer.from_pretrained('{name}').save_pretrained('{folder}')")
  return (f"python -c \"import transformers as t; t.{cls}.from_pretrained('{name}'{extra})"
          f".save_pretrained('{folder}'){tokenizer}\"")


def require_checkpoints(tasks_needed, checkpoints: dict, random_init: bool) -> None:
  """The paper preset fine-tunes pretrained models: each transformer task needs its folder
  (or an explicit --random-init)."""
  if random_init:
    return
  missing = [t for t in tasks_needed if t in PAPER_CHECKPOINTS and t not in checkpoints]
  if missing:
    lines = [f"  --checkpoint {t}=CKPT/{PAPER_CHECKPOINTS[t][0].split('/')[-1]}   (the paper "
             f"used {PAPER_CHECKPOINTS[t][0]}; save it with: {save_command(t)})"
             for t in missing]
    raise UsageError("--preset paper fine-tunes pretrained models (Table 2); give\n"
                     + "\n".join(lines) + "\nor pass --random-init to start from random weights")


def check_disk(out: str, needed_bytes: int) -> None:
  """Enough free space under ``out`` (or its nearest existing parent) for the checkpoints."""
  folder = os.path.abspath(out)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  free = shutil.disk_usage(folder).free
  if free < needed_bytes:
    raise UsageError(f"--out {out}: {free / 2**30:.1f} GiB free, the run's checkpoints need "
                     f"about {needed_bytes / 2**30:.1f} GiB")


def checkpoint_bytes(tasks_built) -> int:
  """The most the run's checkpoints hold at once: one unit at a time (a finished unit's
  steps are discarded), its two kept steps and the one being written. Only the probe
  trajectories (transformer tasks and the ResNet) checkpoint."""
  from experiments.artifacts import checkpoints
  from experiments.probing import trajectory
  kinds = {"translation": "transformer", "code": "transformer", "images": "resnet"}
  sizes = [trajectory.checkpoint_bytes(task, kinds[task.name])
           for task in tasks_built if task.name in kinds]
  return (checkpoints.KEEP + 1) * max(sizes, default=0)
