"""Evaluate a query model against a gallery version.

`ray job submit --working-dir . -- python -m jobs.evaluate ARGS`: ARGS as for `bict-ray evaluate`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
