"""What a run writes: the run folder and config.json, metrics.jsonl and its records, tables,
figures and orbax checkpoints."""
