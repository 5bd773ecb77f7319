"""Upgrade a gallery version with psi, from its embeddings alone (rerun to resume).

`ray job submit --working-dir . -- python -m jobs.upgrade_gallery ARGS`: ARGS as for `bict-ray upgrade`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("upgrade"))
