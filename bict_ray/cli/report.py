"""`bict-ray report RUN_DIR`: write RUN_DIR/report.md and RUN_DIR/plots/ from results.json, print the step table."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write RUN_DIR/report.md and its plots from RUN_DIR/results.json")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding results.json (a path or s3:// URI)")
    parser.set_defaults(func=run)


def run(args) -> int:
    # imported here, not at the top: matplotlib and pandas would slow down every other subcommand
    from bict_ray.pipeline.report import load_results, step_table, write_report
    from bict_ray.storage.rundir import RunDir

    run_dir = RunDir(args.run_dir)  # on object storage: its files come down to a mirror, the report goes back up
    path = write_report(run_dir.path)
    run_dir.sync()
    print(step_table(load_results(run_dir.path)))
    print(f"report: {run_dir.join(path.relative_to(run_dir.path).as_posix())}")
    return 0
