"""The graph flavours of an exported folder, each named once and used by every command and API.

    portable  standard ONNX ops only; onnxruntime runs it (the numerical reference)
    trt       the side branches as qdit4sr plugin nodes; TensorRT engines are built from it and run it
    cpu       standard ONNX ops with per-channel INT8 weights that onnxruntime runs as integer matmuls
              (exporter/cpu_flavour.py); the fast way to run on a CPU

A flavour names both the graph files (``segment_kk.<flavour>.onnx``) and the runtime that executes
them, so ``qdit4sr-export --flavour``, ``qdit4sr-upscale --flavour`` and ``export_segments(flavour=...)``
take the same values. Adding a flavour is one member here plus its rewrite and its runtime backend.
"""
from __future__ import annotations

from enum import Enum
from typing import Iterable


class Flavour(str, Enum):
    PORTABLE = "portable"
    TRT = "trt"
    CPU = "cpu"

    # A member and its value are the same dict key and compare equal, so manifests (plain JSON strings)
    # and code (members) index the same tables.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.value for f in cls)

    @classmethod
    def parse(cls, value: "Flavour | str") -> "Flavour":
        """The member named `value`; a one-line ValueError listing the flavours otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"flavour must be one of {cls.names()}, got {value!r}") from None

    @classmethod
    def parse_many(cls, value: "Flavour | str | Iterable[Flavour | str]") -> tuple["Flavour", ...]:
        """One flavour or several, as members in declaration order without repeats."""
        given = [value] if isinstance(value, str) else list(value)
        if not given:
            raise ValueError(f"name at least one flavour of {cls.names()}")
        chosen = {cls.parse(v) for v in given}
        return tuple(f for f in cls if f in chosen)


ENGINE_FLAVOUR = Flavour.TRT                                  # TensorRT engines are built from these graphs
DEFAULT_EXPORT_FLAVOURS = (Flavour.PORTABLE, Flavour.TRT, Flavour.CPU)  # what qdit4sr-export writes unless told
