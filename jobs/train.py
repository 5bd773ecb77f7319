"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.train --config FILE --set KEY=VALUE ...`.

Same arguments as `bict-ray train`; connects to the cluster the job runs in ($RAY_ADDRESS, set by the job server).
"""

import sys

from bict_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
