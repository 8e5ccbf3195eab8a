"""tl.dot tile sizes, shared by the Triton kernels and the TensorRT plugins' launch configuration
(this module does not import triton, so the plugin code is usable without it)."""
from __future__ import annotations

from ..checks import is_int

MIN_DOT = 16  # smallest tl.dot tile edge


def pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    """The smallest power of two >= n, and at least `floor`."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def check_tile(name: str, size: object) -> int:
    """A tile edge must be a power of two >= MIN_DOT."""
    if not is_int(size) or size < MIN_DOT or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT}, got {size!r}")
    return int(size)
