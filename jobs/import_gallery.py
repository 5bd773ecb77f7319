"""Import embeddings made elsewhere (Parquet, .npz, .npy) as a new gallery version, resumable.

`ray job submit --working-dir . -- python -m jobs.import_gallery ARGS`: ARGS as for `bict-ray import-gallery`.
"""

import sys

from jobs import run

if __name__ == "__main__":
    sys.exit(run("import-gallery"))
