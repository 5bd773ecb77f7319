"""`bict-ray sequence`: run or resume a whole upgrade sequence phi_1 -> ... -> phi_T into a run directory, or, with
--seeds, once per training seed with the spread of the scores."""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args
from bict_ray.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sequence", help="train, upgrade and evaluate a whole upgrade sequence (rerun to resume)")
    add_config_args(parser)
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="run the sequence once per train.seed (e.g. 0,1,2) into OUT/seed_<s>/ and write the "
                             "mean, std and 95%% interval over them to OUT/results.json (default OUT: "
                             "runs/<name>-seeds)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.pipeline.sequence import run_sequence

    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    config = config_from_args(args)
    if seeds is not None:
        return _run_seeds(config, args.out or f"runs/{config.name}-seeds", seeds)
    out = args.out or f"runs/{config.name}"
    results = run_sequence(config, out)
    print(step_summary(results))
    print(f"results: {out}/results.json")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; InputError for an empty list or item, or one that is not an integer >= 0 (a repeated
    seed is refused by run_seeds, before it runs anything)."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise InputError(f"--seeds {text!r}: no seed given; list them separated by commas, e.g. --seeds 0,1,2")
    for position, item in enumerate(items, 1):
        if not item.isdecimal():
            what = "is empty" if not item else f"{item!r} is not an integer >= 0"
            raise InputError(f"--seeds {text!r}: item {position} {what}; list integer seeds separated by commas, "
                             "e.g. --seeds 0,1,2")
    return [int(item) for item in items]


def step_summary(results: dict) -> str:
    """The per-step table, from the report module when it is there."""
    from bict_ray.pipeline.report import step_table

    return step_table(results)


def _run_seeds(config, out: str, seeds: list[int]) -> int:
    from bict_ray.pipeline.report import seeds_table
    from bict_ray.pipeline.seeds import run_seeds

    results = run_seeds(config, out, seeds)
    print(seeds_table(results))
    print(f"results: {out}/results.json (mean over {len(seeds)} seeds; each seed's run in {out}/seed_<s>/)")
    return 0
