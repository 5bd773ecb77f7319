"""Embed the gallery images with phi_1 into a new gallery version.

`ray job submit --working-dir . -- python -m jobs.extract ARGS`: ARGS as for `bict-ray extract`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("extract"))
