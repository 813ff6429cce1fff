"""The published wheel: built from this checkout, checked by twine, installed into a fresh
virtual environment (no site packages) at the lock's versions, where the README's library
examples run. Slow (it installs JAX); .ci/run runs it."""

import glob
import os
import re
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- runs in tests/test_wheel.py -->"


def readme_examples() -> str:
  """The README's ```python blocks that follow the marker line, joined in order."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  blocks = re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 4, "the README's library examples lost their markers"
  return "\n".join(blocks)


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, timeout=1800, **kwargs)
  assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
  return result


@pytest.mark.slow
def test_the_wheel_carries_optclip_only_and_runs_the_readme_examples(tmp_path):
  dist = tmp_path / "dist"
  _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), ROOT])
  wheel = glob.glob(str(dist / "optclip-*.whl"))
  assert len(wheel) == 1
  with zipfile.ZipFile(wheel[0]) as archive:
    top = {name.split("/")[0] for name in archive.namelist()}
  assert {t for t in top if not t.endswith(".dist-info")} == {"optclip"}, top
  _run([sys.executable, "-m", "twine", "check", "--strict", wheel[0]])
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  _run([python, "-m", "pip", "install", "-q", "-c", os.path.join(ROOT, ".ci", "lock.txt"),
        f"{wheel[0]}[models]"])
  script = tmp_path / "examples.py"
  script.write_text(readme_examples())
  # Run outside the checkout, so that nothing but the installed wheel can be imported.
  result = _run([python, str(script)], cwd=str(tmp_path),
                env={"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu"})
  assert "README examples: ok" in result.stdout, result.stdout[-2000:]
