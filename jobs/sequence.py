"""Run (or resume) a whole upgrade sequence.

`ray job submit --working-dir . -- python -m jobs.sequence ARGS`: ARGS as for `bict-ray sequence`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("sequence"))
