"""`bict-ray sequence`: run or resume a whole upgrade sequence phi_1 -> ... -> phi_T into a run directory."""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sequence", help="train, upgrade and evaluate a whole upgrade sequence (rerun to resume)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.pipeline.sequence import run_sequence

    config = config_from_args(args)
    out = args.out or f"runs/{config.name}"
    results = run_sequence(config, out)
    print(step_summary(results))
    print(f"results: {out}/results.json")
    return 0


def step_summary(results: dict) -> str:
    """The per-step table, from the report module when it is there."""
    from bict_ray.pipeline.report import step_table

    return step_table(results)
