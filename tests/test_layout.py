"""The code's shape: no import cycles, no section importing another, probe measurements whose
declarations hold together, records that read back as written, and a report that marks what
a preset switched off as not run."""

import ast
import json
import os
import pkgutil
import types

import numpy as np
import pytest

import experiments
import optclip
from experiments import registry, report
from experiments.artifacts import metrics, records
from experiments.probing import measurements, probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package) -> dict:
  """{module name: source path} of a package and all its subpackages."""
  found = {package.__name__: package.__file__}
  for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    spec = info.module_finder.find_spec(info.name)
    found[info.name] = spec.origin
  return found


def _imports(name, path, known) -> set:
  """The internal modules ``name`` imports (at any depth of its code), ``from a import b``
  read as module a.b where that is a module."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names if alias.name in known)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        out.add(full if full in known else base)
  return {m for m in out if m in known and m != name}


def _graph():
  known = {**_modules(experiments), **_modules(optclip)}
  return {name: _imports(name, path, known) for name, path in known.items()}


def test_no_import_cycles_in_experiments_and_optclip():
  graph = _graph()
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, cycles


def test_no_section_imports_another_section_and_the_library_never_imports_experiments():
  graph = _graph()
  for name, imported in graph.items():
    if name.startswith("experiments.sections."):
      assert not [m for m in imported if m.startswith("experiments.sections")], name
    if name.startswith("optclip"):
      assert not [m for m in imported if m.startswith("experiments")], name


def test_measurement_declarations_hold_together():
  """Every measurement reads only the point's inputs or what an earlier one produces, and
  documents every record field it writes."""
  available = {"params", "directions", "names", "probe_batch", "key", "sample",
               "diagonal_here", "first_point", "adam_preconditioner", "clip_statistics"}
  for m in measurements.MEASUREMENTS:
    assert set(m.reads) <= available, (m.name, set(m.reads) - available)
    available |= set(m.produces)
    assert all(isinstance(text, str) and text for text in m.fields.values()), m.name
  for experiment in registry.EXPERIMENTS:
    assert set(experiment.needs) <= set(measurements.BY_NAME), experiment.name


def test_measure_frees_the_directions_once_their_last_reader_has_run():
  """The memory order follows from the declarations: a value is freed right after its last
  reader, whatever the list's length."""
  import jax.numpy as jnp
  seen = []

  def reader(name):
    def run(point):
      seen.append((name, point["directions"].is_deleted()))
      return {}
    return run

  def after(point):
    seen.append(("after", "directions" in point.values))
    return {"value": 1.0}

  directions = jnp.ones((2, 3))
  chosen = (measurements.Measurement("a", ("directions",), reader("a")),
            measurements.Measurement("b", ("directions",), reader("b")),
            measurements.Measurement("c", ("params",), after, fields=("value",)))
  record = measurements.measure(None, {"params": 1, "directions": directions},
                                types.SimpleNamespace(), chosen)
  assert seen == [("a", False), ("b", False), ("after", False)]
  assert directions.is_deleted() and record == {"value": 1.0}


def test_records_read_back_as_written(tmp_path):
  log = metrics.Metrics(str(tmp_path))
  written = log.log("x", "x/1", a=float("nan"), b=[float("inf"), -float("inf"), 1.5],
                    c={"d": np.float32(2.0), "e": "sgd"})
  back = metrics.read_metrics(str(tmp_path))[0]
  for record in (written, back):
    assert np.isnan(record["a"]) and record["b"][:2] == [np.inf, -np.inf]
    assert record["b"][2] == 1.5 and record["c"] == {"d": 2.0, "e": "sgd"}
  assert '"nan"' in open(tmp_path / "metrics.jsonl").read()  # JSON itself stays valid


def _probe_record(task, trajectory, seed, epoch, rng, *, drop=()):
  """A probe record with every field a probe point writes, random values of the right
  shapes (only the report's reading of them is under test)."""
  labels = [v.label for v in probes.PROBES["transformer"]]
  k, steps = len(labels), 4
  record = {
      "experiment": "trajectory", "key": f"transformer-{task}-{trajectory}-seed{seed}/"
      f"epoch{epoch}/probe", "kind": "transformer", "task": task, "trajectory": trajectory,
      "seed": seed, "epoch": epoch, "algorithms": labels, "step_sizes": [0.0, 0.1, 1.0, 10.0],
      "histogram_range": [-16.0, 0.0], "loss": 2.0, "projection": list(-rng.random(k)),
      "cosine": list(-rng.random(k)), "inner_product": list(-rng.random(k)),
      "norm": list(rng.random(k) + 1), "histograms": {n: [[1] * 64, 0] for n in
                                                       ("sgd", "adam", "adafactor")},
      "sharpness": list(rng.random(k) + 0.1), "sharpness_robust": list(rng.random(k) + 0.1),
      "shifted": [False] * k, "landscape": (2.0 - rng.random((k, steps)) * [0, 1, 1, 1]).tolist(),
      "block_sharpness": {"directions": ["sgd", "sgd, clip grad 0.1", "adam",
                                         "adam, clip grad 0.5"], "blocks": ["embedding", "mlp"],
                          "diagonal": rng.random((4, 2)).tolist(),
                          "cross_share": list(rng.random(4))},
      "attribution": {"fractions": [0.001, 0.01, 0.05, 0.1, 0.5], "sharpness": 1.0,
                      **{f: list(rng.random(5)) for f in (
                          "share", "norm_share", "share_by_gradient", "norm_share_by_gradient",
                          "sharpness_without", "sharpness_clipped",
                          "sharpness_without_by_gradient")}},
      "curvature_sample": {"leaf_shapes": {"w": [4, 4]}, "hessian_diagonal": {"w": list(
          rng.random(8))}, "gradient": {"w": list(rng.random(8))}, "sgd_update": {"w": list(
              rng.random(8))}},
      "lambda_max": 10.0, "clip": {}}
  for field in drop:
    del record[field]
  assert not records.undocumented(record)
  return record


SWITCHES = {  # a --set value that switches a measurement off, and the fields it then lacks
    "lanczos_iterations": (0, ("lambda_max",), "worstcase"),
    "curvature_samples": (0, ("curvature_sample",), "rmed"),
    "landscape_steps": ((0.0,), ("landscape",), "landscape"),
    "skip_measurements": (("block_sharpness",), ("block_sharpness",), "block_sharpness"),
}


# The cheapest switch in the default suite (6 s); the others (14-23 s each) are slow.
@pytest.mark.parametrize("field", [
    f if f == "landscape_steps" else pytest.param(f, marks=pytest.mark.slow)
    for f in sorted(SWITCHES)])
def test_report_marks_a_switched_off_measurement_as_not_run(tmp_path, field):
  from experiments import presets
  value, dropped, section = SWITCHES[field]
  rng = np.random.default_rng(0)
  out = tmp_path / "run"
  out.mkdir()
  with open(out / "metrics.jsonl", "w") as f:
    for task in ("translation", "code"):
      for trajectory in ("sgd", "adam"):
        for epoch in (1, 2):
          record = _probe_record(task, trajectory, 0, epoch, rng, drop=dropped)
          f.write(json.dumps(record) + "\n")
  values = dict(presets.SMOKE.__dict__)
  values[field] = value
  values = {k: (v.__dict__ if hasattr(v, "__dataclass_fields__") else v)
            for k, v in values.items()}
  (out / "config.json").write_text(json.dumps({"command": "reproduce", "preset": "smoke",
                                               "preset_values": values}, default=list))
  text = report.build(str(out))
  assert f"### {section}: not run" in text and f"switched off by {field}" in text
  assert f"{section}: **not run**" in text


def test_block_sharpness_section_shows_every_split_direction_and_says_when_it_cannot_judge(
    tmp_path):
  """A run that split every probe update gets a row per update (the four the verdict reads
  first); one whose split left out SGD gets its table and a not-run verdict, not a crash."""
  from experiments.sections import block_sharpness
  rng = np.random.default_rng(1)
  labels = [v.label for v in probes.PROBES["transformer"]]
  (tmp_path / "tables").mkdir()

  def run(directions):
    made = []
    for epoch in (1, 2):
      record = _probe_record("translation", "sgd", 0, epoch, rng)
      record["block_sharpness"] = {"directions": directions, "blocks": ["embedding", "mlp"],
                                   "diagonal": rng.random((len(directions), 2)).tolist(),
                                   "cross_share": list(rng.random(len(directions)))}
      made.append(record)
    return block_sharpness.write(str(tmp_path), made)

  def directions_shown(text):
    return [line.split("|")[3].strip() for line in text.splitlines()
            if line.startswith("| translation")]

  text, verdicts = run(labels)
  rows = directions_shown(text)
  assert rows[:4] == list(block_sharpness.SHOWN) and sorted(rows) == sorted(labels)
  assert verdicts[0].status in ("reproduced", "partly reproduced", "not reproduced")
  text, verdicts = run(["adam", "lion"])
  assert directions_shown(text) == ["adam", "lion"]
  assert verdicts[0].status == "not run" and "block_sharpness_directions" in str(verdicts[0])
