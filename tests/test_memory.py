"""A worker's peak private memory: sampled, so a peak between two reads is not lost."""

import time

import numpy as np

from bict_ray.distributed.memory import PeakMemory, private_mib


def test_the_private_peak_keeps_memory_freed_since():
    memory = PeakMemory(every=0.01)
    before = memory.peak_uss_mib()
    held = np.ones(200 * 2**20 // 8)  # 200 MiB of this process's own pages, touched
    time.sleep(0.1)
    del held
    time.sleep(0.05)
    now = private_mib()
    peak = memory.peak_uss_mib()
    memory.stop()
    assert peak >= before + 190 and peak >= now + 150
    assert memory.peak_rss_mib() >= peak
