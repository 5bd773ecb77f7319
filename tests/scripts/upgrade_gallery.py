"""A driver that upgrades a gallery on an existing Ray instance, for the test that SIGKILLs it mid-upgrade.

Usage: upgrade_gallery.py RAY_ADDRESS GALLERY TRANSFORM OUT. One task at a time, so that the
upgrade is still running when the test sees its first shards staged.
"""

import sys

import ray

from bict_ray.config import GalleryConfig
from bict_ray.distributed.pipelines import upgrade_gallery
from bict_ray.storage.artifacts import load_artifact


def main(address: str, gallery: str, transform: str, out: str) -> None:
    ray.init(address=address, log_to_driver=False)
    upgrade_gallery(gallery, load_artifact(transform), out, config=GalleryConfig(concurrency=1, cpus_per_task=0.5))
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
