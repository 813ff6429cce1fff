"""The experiments CLI: clean failures, artifacts, report rebuilt from metrics, resume."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from experiments.artifacts import records as records_doc
from experiments.probing import probes, trajectory
from experiments.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, env=None, timeout=900):
  environment = {**os.environ, "OPTCLIP_NO_PROGRESS": "1", **(env or {})}
  environment["PYTHONPATH"] = ROOT + os.pathsep + environment.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=ROOT,
                        env=environment, capture_output=True, text=True, timeout=timeout)


def _killed_after_first_checkpoint(args):
  """Runs the CLI in a subprocess that SIGKILLs itself right after its first checkpoint."""
  code = ("import os, signal, sys\n"
          "from experiments.__main__ import main\n"
          "kill = lambda unit, epoch: os.kill(os.getpid(), signal.SIGKILL)\n"
          f"sys.exit(main({list(args)!r}, after_checkpoint=kill))\n")
  environment = {**os.environ, "OPTCLIP_NO_PROGRESS": "1"}
  environment["PYTHONPATH"] = ROOT + os.pathsep + environment.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment,
                        capture_output=True, text=True, timeout=900)


def test_bad_arguments_exit_2_and_overwrite_nothing(tmp_path, capsys):
  assert main(["theory", "--preset", "huge", "--out", str(tmp_path / "a")]) == 2
  assert "--preset 'huge' is unknown" in capsys.readouterr().err
  assert main(["theory", "--preset", "paper", "--out", str(tmp_path / "b")]) == 2
  assert "--data-dir" in capsys.readouterr().err
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("precious")
  assert main(["theory", "--preset", "smoke", "--out", str(busy)]) == 2
  assert "not empty" in capsys.readouterr().err
  assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "precious"
  afile = tmp_path / "file"
  afile.write_text("x")
  assert main(["theory", "--preset", "smoke", "--out", str(afile)]) == 2
  assert afile.read_text() == "x"
  assert main(["theory", "--preset", "smoke", "--out", str(tmp_path / "m"),
               "--mesh", "data=3,fsdp=5"]) == 2
  assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_theory_and_quadratic_write_a_consistent_run_folder(tmp_path):
  out = str(tmp_path / "run")
  assert main(["theory", "--preset", "smoke", "--out", out]) == 0
  assert main(["quadratic", "--preset", "smoke", "--out", out, "--resume"]) == 0
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["preset"] == "smoke" and "jax" in config["environment"]["versions"]
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  assert len({r["key"] for r in records}) == len(records)
  for r in (r for r in records if r["experiment"] == "theory"):
    # an independent check of the logged numbers: a Rayleigh quotient lies within ±L
    assert abs(r["sgd_sharpness"]) <= r["L"] * (1 + 1e-9)
    assert abs(r["clipped_sharpness"]) <= r["L"] * (1 + 1e-9)
  for name in ("tables/theory.csv", "tables/theory.md", "tables/quadratic.md",
               "figures/quadratic.png", "report.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "figures/quadratic.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  report = open(os.path.join(out, "report.md")).read()
  assert "## Verdicts" in report and "Theorem 2" in report and "## Choices" in report
  os.remove(os.path.join(out, "report.md"))
  assert main(["report", out]) == 0
  assert open(os.path.join(out, "report.md")).read() == report


@pytest.mark.slow
def test_smoke_reproduce_is_complete_and_resume_matches_an_uninterrupted_run(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  result = _cli(["reproduce", "--preset", "smoke", "--out", full])
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("table1", "sharpness_translation_sgd", "sharpness_code_adam",
               "landscape_best_reduction", "gradient_correlation", "sharpness_attribution",
               "gradient_hessian_correlation", "worst_case_sharpness", "clip_ablation",
               "trajectory_losses", "convergence", "smoothness", "resnet_sharpness", "theory",
               "rmed"):
    assert os.path.exists(os.path.join(full, "tables", name + ".csv")), name
  records = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  probes = [r for r in records if r["key"].endswith("/probe")]
  assert probes
  assert not {r["key"]: records_doc.undocumented(r) for r in records
              if records_doc.undocumented(r)}  # every field documented in one place
  # Finished units leave no checkpoint behind (their results are in metrics.jsonl).
  checkpoint_root = os.path.join(full, "checkpoints")
  assert not os.path.isdir(checkpoint_root) or not os.listdir(checkpoint_root)
  for r in probes:
    # Large steps may diverge (stored as "inf"/"nan"); step 0 is the probe point itself.
    landscape = np.asarray(r["landscape"], np.float64)
    defined = np.isfinite(landscape[:, 0])  # the 100% ablation clips to |g| = 0 (undefined)
    np.testing.assert_allclose(landscape[defined, 0], r["loss"], rtol=1e-5)
    paper = [r["algorithms"].index(v.label) for v in probes.PAPER_PROBES[r["kind"]]]
    assert np.all(np.isfinite(np.asarray(r["sharpness"], np.float64)[paper]))
  # A run killed (SIGKILL) right after its first checkpoint, then resumed, ends with the same
  # metrics.
  first = _killed_after_first_checkpoint(["resnet", "--preset", "smoke", "--out", killed])
  assert first.returncode == -9, first.stderr[-3000:]
  assert _cli(["resnet", "--preset", "smoke", "--out", killed, "--resume"]).returncode == 0
  _assert_same_metrics(killed, records, "resnet")
  # Killed again, then the newest checkpoint damaged (and a save's temporary folder left
  # behind): the resume says which checkpoint is unreadable, in one line and without a
  # traceback, sets it aside, starts that unit over and still ends with the same metrics.
  damaged = str(tmp_path / "damaged")
  first = _killed_after_first_checkpoint(["resnet", "--preset", "smoke", "--out", damaged])
  assert first.returncode == -9, first.stderr[-3000:]
  unit = os.path.join(damaged, "checkpoints", "resnet-images-sgd-seed0")
  step = os.path.join(unit, max(os.listdir(unit)))
  data = max((os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs),
             key=os.path.getsize)
  with open(data, "r+b") as f:
    f.seek(16)
    f.write(b"\xff" * 256)
  os.makedirs(os.path.join(unit, "2.orbax-checkpoint-tmp-1234"))
  resumed = _cli(["resnet", "--preset", "smoke", "--out", damaged, "--resume"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"checkpoint {step} is unreadable" in resumed.stderr
  assert "Traceback" not in resumed.stderr and "Event loop is closed" not in resumed.stderr
  assert not [n for n in os.listdir(unit) if "tmp" in n]
  assert os.path.isdir(step + ".unreadable")  # kept, not deleted
  _assert_same_metrics(damaged, records, "resnet")


@pytest.mark.slow
def test_smoke_reproduce_with_every_measurement_switched_off_reports_them_not_run(tmp_path):
  """Every accepted --set value that switches a measurement off, at once: the run ends, and
  its report says what was not run instead of failing."""
  out = str(tmp_path / "off")
  switches = {"lanczos_iterations": "0", "curvature_samples": "0",
              "landscape_steps": "(0.0,)", "skip_measurements": "('block_sharpness',)",
              "smoothness_epochs": "0"}
  result = _cli(["reproduce", "--preset", "smoke", "--out", out]
                + [f"--set={k}={v}" for k, v in switches.items()])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  report = open(os.path.join(out, "report.md")).read()
  for section, field in (("worstcase", "lanczos_iterations"), ("rmed", "curvature_samples"),
                         ("mechanism", "curvature_samples"), ("landscape", "landscape_steps"),
                         ("block_sharpness", "skip_measurements"),
                         ("smoothness", "smoothness_epochs")):
    assert f"{section}: **not run** (switched off by {field}" in report, section
  # The ablation's sharpness is still there; its landscape column is not.
  ablation = open(os.path.join(out, "tables", "clip_ablation.md")).read().splitlines()[2:]
  assert ablation and all(row.rstrip(" |").endswith("–") for row in ablation)


def test_probe_step_reads_every_probe_update_without_taking_the_step(tmp_path):
  """The directions at a probe point equal each probe optimizer's update computed on its
  own (optax, from the same state and gradient) and the state passed in stays usable; a
  finished unit's checkpoints are discarded except those set aside as unreadable; optimizer
  states set aside on disk come back equal."""
  import jax
  import jax.numpy as jnp
  import optax
  from experiments.artifacts import checkpoints
  from experiments.training import loop as training
  loss_fn = lambda p, b: jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2) + jnp.sum(p["b"] ** 4)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.arange(3.0)}
  batch = {"x": jnp.ones((5, 4)) * jnp.arange(5.0)[:, None], "y": jnp.ones((5, 3))}
  tx = probes.train_transform("adam", 1e-2, "transformer")
  state = training.initial_state(tx, params)
  state, _ = training.train_step(loss_fn, tx)(state, batch)  # a history for the moments
  stacked, clips = training.probe_step(loss_fn, tx, lambda s: s.train)(state, batch)
  grads = jax.grad(loss_fn)(state.params, batch)
  for k, (name, probe) in enumerate(tx.probes.items()):
    expected, _ = probe.update(grads, state.opt_state.probes[name], state.params)
    chex.assert_trees_all_close(jax.tree.map(lambda d: d[k], stacked), expected, rtol=1e-6)
  assert int(clips.index) == list(tx.probes).index("adam")
  jax.tree.map(lambda x: x.block_until_ready(), state)  # not donated

  class Task:
    name = "code"
    init_params = staticmethod(lambda seed: params)
  size = sum(x.nbytes for x in jax.tree.leaves(training.initial_state(tx, params)))
  assert trajectory.checkpoint_bytes(Task) == size
  out = str(tmp_path)
  for step in (1, 2):
    checkpoints.save(out, "unit", step, state)
  os.replace(os.path.join(checkpoints.checkpoint_dir(out, "unit"), "1"),
             os.path.join(checkpoints.checkpoint_dir(out, "unit"), "1.unreadable"))
  checkpoints.discard(out, "unit")
  assert os.listdir(checkpoints.checkpoint_dir(out, "unit")) == ["1.unreadable"]
  checkpoints.save(out, "other", 1, state)
  checkpoints.discard(out, "other")
  assert not os.path.exists(checkpoints.checkpoint_dir(out, "other"))
  # Set aside while a probe point is measured: freed, then back bit for bit, folder gone.
  kept = jax.device_get(state.opt_state)
  bring_back = checkpoints.set_aside(out, "unit", state.opt_state)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.opt_state))
  chex.assert_trees_all_equal(bring_back(), kept)
  assert os.listdir(checkpoints.checkpoint_dir(out, "unit")) == ["1.unreadable"]
  # Into pinned host memory (what an accelerator uses; the CPU has the memory kind too).
  state = jax.tree.map(jax.numpy.asarray, kept)
  bring_back = checkpoints.set_aside(out, "unit", state, to="host")
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  back = bring_back()
  chex.assert_trees_all_equal(back, kept)
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(back)} == {"device"}


def test_states_set_aside_on_disk_come_back_sharded_and_bit_for_bit(tmp_path):
  """On a data=2,fsdp=4 mesh (8 host devices, in a subprocess): FSDP-sharded and replicated
  leaves of float32, bfloat16, int32 and a scalar are freed on disk, one file per
  addressable shard, and come back equal to NumPy's copy, placed as they were; the folder
  is gone afterwards."""
  code = f"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from experiments.artifacts import checkpoints
from optclip import sharding
mesh = sharding.mesh_from_spec("data=2,fsdp=4")
rng = np.random.default_rng(0)
values = {{"w": rng.standard_normal((8, 6)).astype(np.float32),
          "h": rng.standard_normal((3, 4)).astype(jnp.bfloat16),
          "count": np.int32(7), "ids": np.arange(5, dtype=np.int32)}}
specs = {{"w": P("fsdp", None), "h": P(None, "fsdp"), "count": P(), "ids": P()}}
tree = {{k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}}
placed = {{k: v.sharding for k, v in tree.items()}}
bring_back = checkpoints.set_aside({str(tmp_path)!r}, "unit", tree, to="disk")
assert all(leaf.is_deleted() for leaf in tree.values())
back = bring_back()
for k, v in values.items():
  assert back[k].dtype == v.dtype and back[k].sharding == placed[k], k
  np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
assert not os.path.exists(os.path.join(checkpoints.checkpoint_dir({str(tmp_path)!r}, "unit"),
                                       checkpoints.SET_ASIDE))
print("OK")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": root})
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_optimizer_states_over_a_sixteenth_of_the_memory_wait_off_the_device():
  """The probe point's rule, at its edge and at the real sizes: t5-small's probe states on a
  23.5 GiB host go off the device (the old rule, states and directions over half the
  memory, kept them, and the probe point was killed at 22.6 GiB); the quick preset's
  translation states (5.2 MiB) stay."""
  import jax.numpy as jnp
  one_mib = {"m": jnp.zeros((512, 512), jnp.float32), "v": jnp.zeros((0,), jnp.bfloat16)}
  assert trajectory._worth_setting_aside(one_mib, memory_bytes=15 * 2 ** 20)
  assert not trajectory._worth_setting_aside(one_mib, memory_bytes=17 * 2 ** 20)
  host = 23.5 * 2 ** 30
  t5_small_states = 25 * 60_506_624 * 4  # 20 probes' states: 25 float32 copies of 60.5M
  assert t5_small_states > host * trajectory.SET_ASIDE_ABOVE > 5.2 * 2 ** 20


def _assert_same_metrics(out, reference_records, kind):
  resumed = {r["key"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
  reference = {r["key"]: r for r in reference_records if r.get("kind") == kind}
  assert set(resumed) == set(reference)
  for key in reference:
    assert resumed[key] == reference[key], key


@pytest.mark.slow  # long on 2 cores (25-50 s): outside the default suite's budget
def test_translation_task_starts_from_a_checkpoint_folder_with_its_tokenizer(tmp_path):
  """--checkpoint translation=FOLDER: the folder's tokenizer encodes the data and its weights
  are every seed's starting point; a folder of the wrong family is refused by name."""
  import chex
  import jax
  import numpy as np
  import optclip.models as models
  from optclip.data import tokenization, translation
  from optclip.models import convert
  from experiments import presets, tasks
  from experiments.errors import UsageError
  preset = presets.PRESETS["smoke"]
  pairs, _ = translation.gettext_pairs()
  tokenizer = tokenization.train_tokenizer([t for p in pairs[:400] for t in p], 300)
  folder = tmp_path / "t5"
  model = models.create(models.PRESETS[preset.translation.model], vocab_size=320)
  params = models.init_params(model, jax.random.PRNGKey(3))
  convert.save_pretrained(str(folder), model, params)
  tokenizer.save(str(folder / "tokenizer.json"))
  task = tasks.build("translation", preset, 0, checkpoints={"translation": str(folder)})
  assert task.info["checkpoint"] == str(folder) and task.info["vocab_size"] == 320
  chex.assert_trees_all_equal(task.init_params(1), params)
  # The folder's 300-token vocabulary encoded the data (the preset would train 128 tokens).
  assert task.info["tokenizer"] == f"from {folder}"
  assert preset.translation.vocab_size < task.train["input_ids"].max() < 300
  assert np.isfinite(float(task.loss_fn(task.init_params(0), task.test_batch)))
  # Training steps donate their state; the folder's weights must outlive each seed's run.
  from experiments.training import loop
  from experiments.training.variants import Variant
  tx = Variant("adam").make(1e-3)
  step = loop.train_step(task.loss_fn, tx)
  for seed in (0, 1):
    state = loop.initial_state(tx, task.init_params(seed))
    for batch in task.epoch_batches(seed, 0):
      state, loss = step(state, batch)
      assert np.isfinite(float(loss))
  chex.assert_trees_all_equal(task.init_params(1), params)
  with pytest.raises(UsageError, match="gpt_neo model, the folder holds t5"):
    tasks.build("code", preset, 0, checkpoints={"code": str(folder)})


def test_cli_help_of_every_command_prints_without_a_traceback(capsys):
  """`python -m experiments --help`, the first command a newcomer types, and every
  subcommand's (a help text with a bare % once broke argparse's formatting)."""
  from experiments import registry
  from experiments.__main__ import main
  result = subprocess.run([sys.executable, "-m", "experiments", "--help"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
  for command in [e.name for e in registry.EXPERIMENTS] + ["reproduce", "report", "plan"]:
    with pytest.raises(SystemExit) as exit_:
      main([command, "--help"])
    assert exit_.value.code == 0, command
    assert "usage:" in capsys.readouterr().out, command


def test_the_cli_refuses_a_microbatch_size_that_does_not_divide_with_exit_2(tmp_path, capsys):
  """--set translation.microbatch_size=3 at smoke (batch and test batch of 16): exit 2
  before anything is written, naming the field and the sizes that divide both."""
  from experiments.__main__ import main
  out = tmp_path / "run"
  assert main(["sharpness", "--preset", "smoke", "--out", str(out),
               "--set", "translation.microbatch_size=3"]) == 2
  err = capsys.readouterr().err
  assert "translation.microbatch_size" in err and "[1, 2, 4, 8, 16]" in err, err
  assert not out.exists()
  # a block split of an update no probe takes: refused the same way, naming the field
  assert main(["sharpness", "--preset", "smoke", "--out", str(out),
               "--set", "block_sharpness_directions=('sgd', 'adamw')"]) == 2
  err = capsys.readouterr().err
  assert "block_sharpness_directions" in err and "'sign sgd'" in err, err
  assert not out.exists()


def test_on_a_mesh_a_microbatch_that_is_not_a_multiple_of_the_devices_is_refused(tmp_path):
  """--mesh data=2 (2 forced CPU devices) splits smoke's batches of 16 over 2 devices, so
  --set translation.microbatch_size=1 exits 2 before anything is written, saying why."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=root, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-m", "experiments", "sharpness", "--preset",
                           "smoke", "--out", str(out), "--mesh", "data=2", "--set",
                           "translation.microbatch_size=1"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "translation.microbatch_size=1" in result.stderr
  assert "multiple of 2" in result.stderr, result.stderr[-2000:]
  assert not out.exists()
