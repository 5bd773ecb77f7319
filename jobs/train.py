"""Train one stage of a sequence: phi_1, phi_t or psi_{t-1->t}.

`ray job submit --working-dir . -- python -m jobs.train ARGS`: ARGS as for `bict-ray train`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("train"))
