"""`bict-ray demo`: the main job on the embedded default (Fashion-MNIST, configs/demo.yaml).

1. the BiCT sequence phi_1 -> phi_2 -> phi_3 (class growth 4 -> 7 -> 10) on the full data, with the arms of
   configs/demo.yaml (BCT only chained and anchored, a closed-form linear psi) beside it on the same phi_1 and v1;
2. a small lambda search on Ray Tune over whole sequences on a reduced slice of the data; its lambda = 0 trial is
   the independent-training + psi baseline;
3. the report (tables and plots) in RUN_DIR/report.md.

Rerunning the same command resumes: finished stages and searches are skipped.
"""

from __future__ import annotations

import time

from bict_ray.cli.common import add_config_args

DEMO_CONFIG = "demo"  # shipped presets (bict_ray/presets): the demo runs from an installed package too
DEMO_SPACE = "demo_lambda"
# the search runs whole sequences per trial: a slice of the data keeps it inside the demo's budget (6,000 training
# images since 2026-12-02: at 12,000 the demo took 1,069 s on 2 cores; the λ study keeps 12,000, cli/study.py)
SEARCH_OVERRIDES = ["data.limit_train=6000", "data.limit_test=3000", "train.epochs=2", "train.cpus_per_worker=1",
                    "eval.matrix=false", "eval.partial_refresh=[]"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on Fashion-MNIST (configs/demo.yaml)")
    add_config_args(parser)
    parser.add_argument("--no-search", action="store_true", help="skip the lambda search")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.config import load_config
    from bict_ray.pipeline.report import step_table, write_report
    from bict_ray.pipeline.sequence import run_sequence
    from bict_ray.pipeline.tune import load_space, run_search
    from bict_ray.storage.rundir import RunDir

    started = time.perf_counter()
    config = load_config(args.config or DEMO_CONFIG, args.overrides)
    out = RunDir.local(args.out or "runs/demo", "the demo").path  # before anything runs
    print(f"[demo] 1/3 the BiCT upgrade sequence on {config.data.kind} into {out}", flush=True)
    results = run_sequence(config, out)
    if not args.no_search:
        search_config = load_config(args.config or DEMO_CONFIG, [*args.overrides, *SEARCH_OVERRIDES])
        space = load_space(DEMO_SPACE, search_config)
        tune_dir = out / "tune"
        if (tune_dir / "best_config.json").is_file():
            print(f"[demo] 2/3 lambda search: done already ({tune_dir})", flush=True)
        else:
            print(f"[demo] 2/3 lambda search on a slice of the data ({', '.join(SEARCH_OVERRIDES[:3])})", flush=True)
            run_search(search_config, space, out, resume=(tune_dir / "ray" / space.name).exists())
    print("[demo] 3/3 report", flush=True)
    report = write_report(out)
    print()
    print(step_table(results))
    print(f"\nreport: {report}   ({time.perf_counter() - started:.0f} s)")
    return 0
