"""`bict-ray report RUN_DIR`: write RUN_DIR/report.md and RUN_DIR/plots/ from results.json, print the step table."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write RUN_DIR/report.md and its plots from RUN_DIR/results.json")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding results.json")
    parser.set_defaults(func=run)


def run(args) -> int:
    # imported here, not at the top: matplotlib and pandas would slow down every other subcommand
    from bict_ray.pipeline.report import load_results, step_table, write_report

    path = write_report(args.run_dir)
    print(step_table(load_results(args.run_dir)))
    print(f"report: {path}")
    return 0
