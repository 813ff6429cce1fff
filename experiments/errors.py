"""The errors the CLI reports in one line instead of a traceback: a user's bad input
(`UsageError`, exit code 2, nothing written or overwritten) and a run the machine could not
carry on (`RunError`, exit code 1, everything written before it kept)."""


class UsageError(Exception):
  """Bad command-line input (a preset, a ``--set`` value, a data or checkpoint folder)."""


class RunError(Exception):
  """The machine stopped the run (a full disk while checkpointing, a lost process); what
  was written before is intact and ``--resume`` continues from it."""
