"""Evaluate a query model against a gallery version.

`python -m jobs.evaluate --config ... --set ...`, the arguments of `bict-ray evaluate`.
"""

import sys

from bict_ray.cli import main as cli_main


def main() -> int:
    return cli_main(["evaluate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
