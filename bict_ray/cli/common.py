"""Arguments that every run-producing subcommand shares: --config, --set, --out."""

from __future__ import annotations

import argparse

from bict_ray.config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser, *, out: bool = True) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    if out:
        parser.add_argument("--out", "-o", help="run directory (a local path or shared file system mount)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
