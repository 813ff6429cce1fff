"""The report's sections, one module each (as big_vision keeps one evaluator per file).

A section reads metrics.jsonl records and writes its tables, figures, text and verdict
lines; an experiment that measures something of its own also has its ``run`` here. A section
never imports another section: what two of them share lives in `experiments.probing`,
`experiments.artifacts` or `experiments.paper`.
"""
