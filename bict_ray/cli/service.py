"""`bict-ray upgrade-service`: upgrade a service that exists, from its deployed model, its stored gallery and its
labelled data (docs/SERVICE.md), resumable stage by stage."""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args
from bict_ray.config import SERVICE_STAGES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "upgrade-service",
        help="train a backward-compatible model against a service's deployed one, upgrade its stored gallery with "
             "psi, score it on labelled sets, export it (rerun to resume)")
    add_config_args(parser)
    parser.add_argument("--stage", dest="stages", action="append", choices=SERVICE_STAGES, metavar="STAGE",
                        help=f"run only this stage (repeatable; default: all, in order): {', '.join(SERVICE_STAGES)}")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.cli.sequence import step_summary
    from bict_ray.pipeline.service import STAGES, run_service

    config = config_from_args(args)
    out = args.out or f"runs/{config.name}"
    stages = [stage for stage in STAGES if stage in (args.stages or STAGES)]
    results = run_service(config, out, stages=stages)
    if results.get("steps"):
        print(step_summary(results))
    for name, record in results.get("service", {}).items():
        if name != "timings":
            print(f"{name}: {record.get('path')}")
    print(f"results: {out}/results.json")
    return 0
