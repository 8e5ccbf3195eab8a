"""Content-addressed external data: large initializers of every segment graph live once in one file.

The segment graphs of one export differ only in their small activation constants; every weight is
the same. Each large tensor is therefore appended once to a shared file (``weights.bin``), keyed by
the sha256 of its raw bytes, and every graph that needs it points at the same offset. Two tensors
with equal bytes share storage even under different names, dtypes or shapes: the TensorProto
carries those, the file only the bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..artifacts.manifest import WEIGHTS_FILE  # noqa: F401  (the file this store writes)

DEFAULT_THRESHOLD_BYTES = 1024  # smaller tensors (scales, shapes, clip bounds) stay inline in the graph
ALIGNMENT = 64                  # every blob starts on a 64-byte boundary (vector loads, mmap friendliness)


class WeightStore:
    """Appends unique tensor bytes to one file; hands out TensorProtos that reference them."""

    def __init__(self, path: Path, threshold_bytes: int = DEFAULT_THRESHOLD_BYTES):
        if threshold_bytes < 0:
            raise ValueError("threshold_bytes must be >= 0")
        self.path = Path(path)
        self.threshold_bytes = threshold_bytes
        self._file = open(self.path, "wb")
        self._offsets: dict[str, tuple[int, int]] = {}
        self._file_hash = hashlib.sha256()
        self.size = 0
        self.requested_bytes = 0  # bytes asked for, before deduplication (for reports)

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    @property
    def sha256(self) -> str:
        """Hash of the whole file as written so far (no re-read needed)."""
        return self._file_hash.hexdigest()

    @property
    def num_blobs(self) -> int:
        return len(self._offsets)

    # -- storage --------------------------------------------------------------------------------
    def add(self, raw: bytes) -> tuple[int, int]:
        """(offset, length) of these bytes in the file, appending them only if new."""
        self.requested_bytes += len(raw)
        key = hashlib.sha256(raw).hexdigest()
        found = self._offsets.get(key)
        if found is not None:
            return found
        pad = (-self.size) % ALIGNMENT
        if pad:
            self._write(b"\0" * pad)
        offset = self.size
        self._write(raw)
        self._offsets[key] = (offset, len(raw))
        return offset, len(raw)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file_hash.update(data)
        self.size += len(data)

    def tensor(self, name: str, data_type: int, dims: list[int] | tuple[int, ...], raw: bytes) -> TensorProto:
        """A TensorProto holding `raw` (already in ONNX raw layout): external when large, inline otherwise."""
        proto = TensorProto(name=name, data_type=data_type, dims=list(dims))
        if len(raw) < self.threshold_bytes:
            proto.raw_data = raw
            return proto
        self._point_external(proto, raw)
        return proto

    def array(self, name: str, values: np.ndarray) -> TensorProto:
        """A TensorProto from a numpy array of a standard dtype (use `tensor` for INT4)."""
        values = np.ascontiguousarray(values)
        return self.tensor(name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype), values.shape, values.tobytes())

    def _point_external(self, proto: TensorProto, raw: bytes) -> None:
        offset, length = self.add(raw)
        proto.ClearField("raw_data")
        proto.data_location = TensorProto.EXTERNAL
        del proto.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value

    def externalize(self, model: onnx.ModelProto) -> None:
        """Move every large inline initializer of `model` into the store, in place."""
        for proto in model.graph.initializer:
            if proto.data_location == TensorProto.EXTERNAL:
                continue
            raw = _raw_bytes(proto)
            if len(raw) >= self.threshold_bytes:
                self._point_external(proto, raw)
                # Typed fields (float_data, ...) would shadow nothing but still take space.
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "string_data"):
                    proto.ClearField(field)


def _raw_bytes(proto: TensorProto) -> bytes:
    if proto.HasField("raw_data"):
        return proto.raw_data
    if proto.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.STRING):
        raise ValueError(f"initializer {proto.name}: only raw_data can be moved to external data for this dtype")
    return numpy_helper.to_array(proto).tobytes()
