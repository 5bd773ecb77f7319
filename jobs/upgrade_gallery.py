"""Upgrade a gallery version with psi, from its embeddings alone (rerun to resume).

`python -m jobs.upgrade_gallery --config ... --set ...`, the arguments of `bict-ray upgrade`.
"""

import sys

from bict_ray.cli import main as cli_main


def main() -> int:
    return cli_main(["upgrade", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
