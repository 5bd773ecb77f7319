"""A gallery version with new rows in its space appended, as a new version (rerun to resume).

`ray job submit --working-dir . -- python -m jobs.append_gallery ARGS`: ARGS as for `bict-ray append`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("append"))
