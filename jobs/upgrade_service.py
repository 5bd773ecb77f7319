"""Upgrade a service from its deployed model, its stored gallery and its labelled data, resumable stage by stage.

`ray job submit --working-dir . -- python -m jobs.upgrade_service ARGS`: ARGS as for `bict-ray upgrade-service`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("upgrade-service"))
