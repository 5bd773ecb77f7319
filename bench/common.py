"""What every benchmark shares: timing the best of a few runs, and a record of the machine it ran on."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time


def best_of(repeat: int, run):
    """(best seconds over `repeat` runs, the last run's result)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine_info(load_start, **versions: str) -> dict:
    """CPU count and model, the load average at the start and now (the machine may be shared: the load says how
    much of it other work took meanwhile), Python and the given library versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **versions,
    }


def print_rows(rows, decimals: int = 3) -> None:
    """The table of a benchmark: (name, seconds or None, note) rows, names and seconds aligned."""
    width = max(len(name) for name, _, _ in rows)
    for name, seconds, note in rows:
        shown = "" if seconds is None else f"{seconds:9.{decimals}f} s"
        print(f"  {name:<{width}}  {shown:>11}  {note}")


def start_ray(num_cpus: int, attempts: int = 3) -> tuple[bool, float]:
    """(whether this call started Ray, seconds). A fresh local instance, never another one on the machine
    (``address="local"``); retried, since another instance starting at the same time may take its ports."""
    import ray

    from bict_ray.distributed.cluster import set_train_env_defaults

    if ray.is_initialized():
        return False, 0.0
    set_train_env_defaults()  # the project's settings, so a benchmark measures what a run gets
    for attempt in range(attempts):
        started = time.perf_counter()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            return True, time.perf_counter() - started
        except Exception as err:  # a port collision surfaces as several error types
            if attempt == attempts - 1:
                raise
            print(f"ray.init failed ({type(err).__name__}: {err}); retrying", file=sys.stderr)
            ray.shutdown()
            time.sleep(2 + 3 * attempt)
    raise AssertionError("unreachable")


def log(message: str) -> None:
    """Progress on stderr: stdout carries the table and the JSON line, which must be the last line."""
    print(message, file=sys.stderr, flush=True)


def machine_line(machine: dict) -> str:
    """The table's line on the machine a run measured (``machine_info``'s record)."""
    return (f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), load {machine['load_avg_start']} -> "
            f"{machine['load_avg_end']}; torch {machine['torch']}, ray {machine['ray']}")


def parse_with_presets(parser, argv, quick: dict, full: dict):
    """Parse ``argv``; every option left unset takes the preset of its mode (``--quick`` or the full run)."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def require_positive(parser, args, keys) -> None:
    """Refuse, as argparse refuses, any of ``keys`` (option names with underscores) below 1."""
    for key in keys:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
