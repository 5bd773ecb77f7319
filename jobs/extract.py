"""Embed the test split (the gallery) with phi_1 into a new gallery version.

`python -m jobs.extract --config ... --set ...`, the arguments of `bict-ray extract`.
"""

import sys

from bict_ray.cli import main as cli_main


def main() -> int:
    return cli_main(["extract", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
