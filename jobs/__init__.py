"""Entry points for `ray job submit --working-dir . -- python -m jobs.<name> ARGS`, one per CLI command.

A job's driver runs on the cluster, which the CLI joins through $RAY_ADDRESS (set by the job server); each job is
the CLI command of the same purpose, so the two never drift apart.
"""

import sys

from bict_ray.cli import main


def run(command: str) -> int:
    """``bict-ray <command>`` with this process's arguments."""
    return main([command, *sys.argv[1:]])
