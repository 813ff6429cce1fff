"""The planner (issue: paper scale) against a hand count, and the CLI's plan table."""

import jax
import jax.numpy as jnp
import pytest

import optclip.models as models
from experiments import plan
from experiments.__main__ import main


def test_forward_flops_match_a_hand_count_for_gpt_neo():
  """XLA's cost analysis of one GPT-Neo forward against the matrix products counted by
  hand (2 FLOPs per multiply-add); elementwise work (GELU, layer norm, softmax) adds a few
  percent, so they must agree to 10%.

  GPT-Neo with hidden size d, L layers, T = batch × length tokens, vocabulary V, block
  length n: per layer q, k, v and out projections 4 · 2Td², the MLP 2 · 2T·d·4d, and the
  attention scores and their weighted sum 2 · 2·T·n·d (every position against the whole
  block, masked afterwards, global and local layers alike); then the tied LM head 2TdV.
  """
  d, layers, heads, vocab, batch_size, length = 64, 2, 4, 512, 8, 64
  model = models.create("gpt-neo-tiny", hidden_size=d, num_layers=layers, num_heads=heads,
                        vocab_size=vocab, max_position_embeddings=length, window_size=length,
                        attention_types=((("global", "local"), 1),))
  params = models.init_params(model, jax.random.PRNGKey(0))
  ints = lambda: jnp.zeros((batch_size, length), jnp.int32)
  batch = {"input_ids": ints(), "attention_mask": ints() + 1, "labels": ints()}
  tokens = batch_size * length
  per_layer = 4 * 2 * tokens * d * d + 2 * 2 * tokens * d * 4 * d + 2 * 2 * tokens * length * d
  hand = layers * per_layer + 2 * tokens * d * vocab
  counted = plan._flops(jax.jit(models.make_loss_fn(model)), params, batch)
  assert abs(counted - hand) / hand < 0.10, (counted, hand)


@pytest.mark.slow
def test_plan_prints_a_table_for_a_preset(capsys):
  """Compiles every program of every smoke task (2-6 minutes on 2 cores): slow."""
  assert main(["plan", "--preset", "smoke", "--set", "lanczos_iterations=4"]) == 0
  out = capsys.readouterr().out
  assert "| sharpness" in out and "| resnet (Table 9) | images |" in out and "Total:" in out


def test_plan_refuses_bad_arguments_with_exit_2(capsys):
  assert main(["plan", "--preset", "smoke", "--set", "nope=1"]) == 2
  assert "nope" in capsys.readouterr().err
  assert main(["plan", "--preset", "smoke", "--device", "a100-81gb"]) == 2
  assert "a100-81gb" in capsys.readouterr().err
  assert main(["plan", "--preset", "smoke", "--tasks", "translation,nope"]) == 2
  assert "--tasks" in capsys.readouterr().err


@pytest.mark.slow  # long on 2 cores (45-210 s): outside the default suite's budget
def test_the_planned_peak_is_within_25_percent_of_the_measured_one():
  """The planner's peak of a compiled program (XLA's memory analysis: arguments + outputs +
  temporaries - aliased) against the resident memory the call really adds on this CPU, plus
  its arguments (already resident): the quick code task's train step at 1024 sequences
  (about 0.55 GiB of temporaries, so that the allocator's fixed costs do not dominate)."""
  import json
  import os
  import subprocess
  import sys
  import pytest
  if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("needs Linux's peak-RSS reset")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, os.path.join(root, "tests", "plan", "measure_rss.py"),
                           "1024"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": root})
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  measured = found["measured_growth"] + found["arguments"]
  assert abs(found["peak"] - measured) <= 0.25 * measured, found


@pytest.mark.slow
def test_the_largest_microbatch_that_fits_is_the_largest_whose_compiled_peak_fits():
  """For the smoke classification model at batches of 256 sequences of 64 tokens (so that
  activations, not parameters, set the peak) and a budget between the peaks at micro-
  batches of 1 and 256: the answer's own compiled peak fits, and the peak of the next
  larger size that divides both batches, compiled independently, does not."""
  import dataclasses
  from experiments import presets
  smoke = presets.PRESETS["smoke"]
  task = dataclasses.replace(smoke.classification, batch_size=256, test_size=256,
                             train_size=256, max_length=64)
  preset = dataclasses.replace(smoke, classification=task)

  def peak(size):
    sized = dataclasses.replace(preset, classification=dataclasses.replace(
        task, microbatch_size=size))
    return plan.plan_training("classification", sized, plan.Layout(None), 1, 1)[
        "phases"]["peak"]

  sizes = [d for d in plan.divisors(task.batch_size) if task.test_size % d == 0]
  low, high = peak(sizes[0]), peak(sizes[-1])
  assert low < high
  usable = (low + high) / 2
  size, found = plan.largest_microbatch(preset, "classification", "training", usable)
  assert size is not None and found <= usable and found == peak(size)
  larger = [s for s in sizes if s > size]
  assert larger and peak(larger[0]) > usable
