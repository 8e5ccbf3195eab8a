"""qdit4sr.hostmem on this platform: glibc's malloc takes the fixed mmap threshold, and a block of that size
or more, once freed, no longer counts in the process's resident memory."""
import sys

import numpy as np
import pytest

from qdit4sr import hostmem


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc only")
def test_freed_blocks_above_the_threshold_leave_resident_memory():
    np.ones(24 * 2**20, dtype=np.uint8)   # made and freed: glibc's own threshold rises to 24 MB
    assert hostmem.return_large_blocks_to_os()
    size = 4 * hostmem.MMAP_THRESHOLD_BYTES   # 16 MB: from the heap under glibc's raised threshold
    before = _rss_bytes()
    blocks, pins = [], []
    for _ in range(8):   # each big block followed by a small one that stays: heap holes could not be trimmed
        blocks.append(np.ones(size, dtype=np.uint8))
        pins.append(np.ones(64 * 1024, dtype=np.uint8))
    assert _rss_bytes() - before > 7 * size    # touched, so resident
    del blocks
    assert _rss_bytes() - before < size        # unmapped at free, not kept in the heap
    assert isinstance(hostmem.trim(), bool)


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hostmem._glibc() is None and not hostmem.return_large_blocks_to_os() and not hostmem.trim()
