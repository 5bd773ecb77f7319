"""A process's peak memory, as a training worker reports it every epoch (``peak_rss_mib``, ``peak_uss_mib``).

The kernel keeps the peak resident set (``ru_maxrss``), but that counts the pages of Ray's object store a process
has mapped: a worker that has read every block of a stream shows them all, although they are shared with every
other process on the node and freed by the store, not by the worker. What a worker holds of its own is its
private memory (USS: private clean + private dirty pages), which no counter keeps a peak of, so a thread samples
it, once a second: a read of smaps_rollup costs a torch process milliseconds of kernel time (BENCHMARKS.md,
"Training ingest"), and what a worker holds for long enough to matter (a split, a buffer) it holds for seconds.
"""

from __future__ import annotations

import resource
import threading

SMAPS_ROLLUP = "/proc/{pid}/smaps_rollup"


class PeakMemory:
    """Peak private memory of this process, sampled every ``every`` seconds from when it is made, and the kernel's
    peak resident set. Where /proc has no smaps_rollup (not Linux), the private peak is None."""

    def __init__(self, every: float = 1.0):
        self._peak = private_mib()
        self._stop = threading.Event()
        if self._peak is not None:
            self._thread = threading.Thread(target=self._sample, args=(every,), name="peak-memory", daemon=True)
            self._thread.start()

    def peak_uss_mib(self) -> float | None:
        now = private_mib()
        if now is not None:
            self._peak = max(self._peak, now)
        return self._peak

    @staticmethod
    def peak_rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux counts it in KiB

    def stop(self) -> None:
        self._stop.set()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak_uss_mib()


def private_mib(pid: int | str = "self") -> float | None:
    """A process's private memory now (this one's by default), MiB; None where the system does not say (not Linux,
    or the process is gone)."""
    try:
        with open(SMAPS_ROLLUP.format(pid=pid)) as f:
            kib = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return None
    return kib / 1024
