"""The one error a user's input can cause: printed by the CLI as ``error: ...`` and turned
into exit code 2, with nothing written or overwritten."""


class UsageError(Exception):
  """Bad command-line input (a preset, a ``--set`` value, a data or checkpoint folder)."""
