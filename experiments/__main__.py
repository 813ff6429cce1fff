"""Command line: `python -m experiments <command> [options]`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  quad = sub.add_parser("quadratic", help="the introduction's f(x) = xᵀAx example")
  quad.add_argument("--out", default="runs/quadratic", help="output folder")
  quad.add_argument("--steps", type=int, default=100)
  args = parser.parse_args(argv)
  if args.command == "quadratic":
    from experiments import quadratic
    quadratic.main(args.out, quadratic.QuadraticConfig(steps=args.steps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
