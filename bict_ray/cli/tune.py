"""`bict-ray tune`: search lambda (and friends) over whole upgrade sequences with Ray Tune."""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="search lambda across whole upgrade sequences (Ray Tune)")
    add_config_args(parser)
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/lambda_grid.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.pipeline.tune import load_space, run_search

    config = config_from_args(args)
    space = load_space(args.space, config)
    out = args.out or f"runs/{config.name}-{space.name}"
    summary = run_search(config, space, out, resume=args.resume)
    print(f"best {summary['metric']}: {summary['best_value']:.4f} with {summary['best_params']}")
    return 0
