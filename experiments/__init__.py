"""Experiments reproducing Pan & Li (2023); run with `python -m experiments <command>`."""
