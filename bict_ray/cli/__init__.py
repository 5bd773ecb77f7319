"""The ``bict-ray`` command line: one subcommand per module in this package, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bict_ray.errors import project_error

# module name -> the subcommands it registers; imported lazily so `bict-ray env` does not import Ray
COMMAND_MODULES = ("env", "splits", "train", "sequence", "tune", "study", "gallery", "service", "report", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bict-ray", description="Bidirectional Compatible Training (BiCT) for image retrieval, on Ray.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"bict_ray.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # a problem bict-ray named (here or inside a Ray task) ends with that one line; a bug keeps its traceback
        known = project_error(err)
        if known is None or os.environ.get("BICT_DEBUG"):
            raise
        print(f"bict-ray {args.command}: error: {known}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
