"""Host memory: hand large freed blocks back to the operating system at once (glibc).

glibc's malloc raises its mmap threshold to the size of the largest block freed so far (up to
32 MB), after which mid-sized tensors come from the heap, whose freed holes are rarely returned
or reused well. A full-size export allocates and frees thousands of 1-100 MB tensors (weights
layer by layer, activations while tracing), and measured peak RSS then grew by about 170 MB per
transformer block at one export tile; with a fixed 4 MB threshold it stays flat in depth. Other C
libraries are left as they are.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3   # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 * 2**20


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def return_large_blocks_to_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations from `threshold_bytes` up by mmap (returned at free); True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


def trim() -> bool:
    """Return free heap pages to the OS now (glibc malloc_trim); True when memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
