"""Setting a run up before it starts: ``--set`` overrides, the checks that run before anything
is written, and the context every experiment receives."""
