"""Writes .ci/lock.txt: the exact versions of optclip[test]'s whole dependency closure in
the current environment (run after `pip install -e ".[test]"` to refresh the lock)."""

import importlib.metadata as metadata
import os
import re

from packaging.requirements import Requirement

HERE = os.path.dirname(os.path.abspath(__file__))


def closure(name: str, extras: set) -> dict:
  found, todo = {}, [(name, frozenset(extras))]
  while todo:
    package, wanted = todo.pop()
    key = re.sub(r"[-_.]+", "-", package).lower()
    try:
      dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
      continue  # an optional dependency this platform does not install
    if key != "optclip":
      found[key] = dist.version
    for line in dist.requires or []:
      requirement = Requirement(line)
      environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
      if requirement.marker and not any(requirement.marker.evaluate(e) for e in environments):
        continue
      sub = re.sub(r"[-_.]+", "-", requirement.name).lower()
      if sub not in found or requirement.extras:
        todo.append((requirement.name, frozenset(requirement.extras)))
  return found


if __name__ == "__main__":
  pins = closure("optclip", {"test"})
  # The CPU build of torch carries a local label (+cpu); `==2.13.0` matches it.
  lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
  with open(os.path.join(HERE, "lock.txt"), "w") as f:
    f.write("# The reproduction's exact versions (python .ci/lock.py writes this file).\n")
    f.write("\n".join(lines) + "\n")
  print(len(lines), "pins")
