"""Search lambda (and what the space names) over whole sequences on Ray Tune.

`ray job submit --working-dir . -- python -m jobs.tune_lambda ARGS`: ARGS as for `bict-ray tune`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("tune"))
