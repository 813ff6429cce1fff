"""``--set FIELD=VALUE``: a preset with some fields replaced, type-checked.

FIELD is a field of `experiments.presets.Preset` (``epochs``, ``probe_batch``, ...) or, dotted,
of one of its tasks (``translation.batch_size``). VALUE is a Python literal (``8``,
``1e-3``, ``(2, 5)``, ``{'sgd': 0.1, 'adam': 2e-4}``) or, for a text field, the bare text.
"""

from __future__ import annotations

import ast
import dataclasses
import typing

from experiments.errors import UsageError
from experiments.presets import Preset, TaskPreset, problems

# Fields whose text values are one of a few choices.
CHOICES = {"probe_batch": ("train", "held-out"), "curvature_at": ("every", "last"),
           "source": ("offline", "paper")}


def _literal(text: str, kind: str):
  if kind == "str":
    return text
  if kind == "bool" and text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as error:
    raise ValueError(f"{text!r} is not a {kind} literal") from error


def _check(value, kind: str):
  """``value`` as the field's type; ValueError saying what was expected."""
  if kind == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"expected an integer, got {value!r}")
  elif kind == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"expected a number, got {value!r}")
    value = float(value)
  elif kind == "tuple":
    if not isinstance(value, (tuple, list)):
      raise ValueError(f"expected a tuple such as (2, 5), got {value!r}")
    value = tuple(value)
  elif kind == "dict":
    if not isinstance(value, dict):
      raise ValueError(f"expected a dict such as {{'sgd': 0.1}}, got {value!r}")
  elif kind == "bool":
    if not isinstance(value, bool):
      raise ValueError(f"expected True or False, got {value!r}")
  return value


def _fields(cls) -> dict:
  hints = typing.get_type_hints(cls)
  return {f.name: getattr(hints[f.name], "__name__", str(hints[f.name]))
          for f in dataclasses.fields(cls)}


def apply(preset: Preset, assignments) -> tuple:
  """(the preset with every ``FIELD=VALUE`` applied, {field: value} as applied).

  Raises:
    UsageError: naming the field, for an unknown field, a value of the wrong type or a
      text value outside its choices; nothing is run or written then.
  """
  applied = {}
  for assignment in assignments:
    field, sep, text = assignment.partition("=")
    field = field.strip()
    if not sep or not field:
      raise UsageError(f"--set {assignment!r}: expected FIELD=VALUE")
    task, _, name = field.rpartition(".")
    owner = preset if not task else getattr(preset, task, None)
    if task and not isinstance(owner, TaskPreset):
      raise UsageError(f"--set {field}: {task!r} is not a task of the preset (translation, "
                       "code, classification, images)")
    kinds = _fields(type(owner))
    if name not in kinds or (not task and kinds[name] == "TaskPreset") or name == "name":
      known = sorted(k for k, v in kinds.items() if v != "TaskPreset" and k != "name")
      raise UsageError(f"--set {field}: unknown field; known: {', '.join(known)}"
                       + ("" if task else " (or TASK.FIELD)"))
    try:
      value = _check(_literal(text.strip(), kinds[name]), kinds[name])
    except ValueError as error:
      raise UsageError(f"--set {field}: {error}") from error
    if name in CHOICES and value not in CHOICES[name]:
      raise UsageError(f"--set {field}: expected one of {CHOICES[name]}, got {value!r}")
    if name == "model":
      import optclip.models as models
      if value not in models.PRESETS:
        raise UsageError(f"--set {field}: unknown model {value!r}; known: "
                         f"{sorted(models.PRESETS)}")
    owner = dataclasses.replace(owner, **{name: value})
    preset = dataclasses.replace(preset, **{task: owner}) if task else owner
    applied[field] = value
  wrong = problems(preset)
  if wrong:
    raise UsageError("; ".join(
        f"--set {field}={applied[field]!r}: {problem}" if field in applied else
        f"the preset's {field}={_value(preset, field)!r} does not fit the values set "
        f"({', '.join(applied)}): {problem}; set it too" for field, problem in wrong.items()))
  return preset, applied


def _value(preset, field):
  task, _, name = field.rpartition(".")
  return getattr(getattr(preset, task) if task else preset, name)
