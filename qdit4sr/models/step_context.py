"""Which sampler step the transformer is being called for.

Quantized layers switch activation bits per timestep segment, and calibration
records statistics per step; both read the step index set here by the pipeline.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_current_step: contextvars.ContextVar[int | None] = contextvars.ContextVar("qdit4sr_step", default=None)


def current_step() -> int | None:
    """The sampler step index of the transformer call in progress, or None outside sampling."""
    return _current_step.get()


@contextlib.contextmanager
def step_scope(step_index: int) -> Iterator[None]:
    token = _current_step.set(int(step_index))
    try:
        yield
    finally:
        _current_step.reset(token)
