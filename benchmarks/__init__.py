"""One script per performance claim, each printing ratios measured in the same run.

Run from the repository root as modules, e.g. ``python -m benchmarks.clipping``.
"""
