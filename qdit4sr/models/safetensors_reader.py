"""Read safetensors files one tensor at a time, without memory-mapping the whole file.

`safetensors.torch.load_file` materialises every tensor of a file at once, and `safe_open` maps the
file, so its pages count in the process's resident memory until it is closed: loading a 5.4 GB bf16
checkpoint that way peaks at twice the model. Here the header is parsed once (the format: 8-byte
little-endian header length, a JSON header naming dtype, shape and byte range of each tensor, then
the data) and each tensor is read with `readinto` straight into its own storage, so peak memory is
the model plus one tensor (plus its converted copy when a dtype is asked for).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit; a larger length means a corrupt file
CHUNK_BYTES = 16 * 2**20    # staging buffer for converted reads


class SafetensorsFormatError(ValueError):
    """A file that is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    end: int


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Name -> entry for every tensor of the file (no tensor data is read)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{path.name}: header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{path.name}: header is not valid JSON ({e})") from e
    base = 8 + length
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            start, end = (base + int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{path.name}: malformed entry for {name} ({e!r})") from e
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize or end > size:
            raise SafetensorsFormatError(f"{path.name}: {name} has {end - start} bytes for shape {shape} "
                                         f"{spec['dtype']} (file truncated or corrupt?)")
        entries[name] = TensorEntry(name, dtype, shape, start, end)
    return entries


def _read_exact(f, view: memoryview, what: str) -> None:
    if f.readinto(view) != len(view):
        raise SafetensorsFormatError(f"{what} ends early (file truncated?)")


def read_tensor(path: str | Path, entry: TensorEntry, file=None, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """One tensor in fresh storage, converted to `dtype` (None: as stored) on `device`.

    Stored as asked: read straight into the result. Otherwise the bytes pass through one staging
    buffer of at most `chunk_bytes`, so the stored copy never exists in full beside the result.
    """
    device = torch.device(device)
    target = entry.dtype if dtype is None else dtype
    own = file is None
    f = open(path, "rb") if own else file
    what = f"{Path(path).name}: {entry.name}"
    try:
        f.seek(entry.start)
        if target == entry.dtype and device.type == "cpu":
            out = torch.empty(entry.shape, dtype=target)
            if out.numel():
                _read_exact(f, memoryview(out.view(-1).view(torch.uint8).numpy()), what)
            return out
        out = torch.empty(entry.shape, dtype=target, device=device)
        flat = out.view(-1)
        step = max(1, chunk_bytes // entry.dtype.itemsize)
        staging = torch.empty(min(step, flat.numel()), dtype=entry.dtype)
        for begin in range(0, flat.numel(), step):
            n = min(step, flat.numel() - begin)
            _read_exact(f, memoryview(staging[:n].view(torch.uint8).numpy()), what)
            flat[begin:begin + n].copy_(staging[:n])
        return out
    finally:
        if own:
            f.close()


def iter_tensors(path: str | Path, names: list[str] | None = None, dtype_of=None,
                 device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in file order (or for `names` only), one tensor in memory at a time.

    `dtype_of(entry)` gives each tensor's target dtype (None: as stored).
    """
    entries = read_header(path)
    wanted = sorted(entries.values(), key=lambda e: e.start) if names is None else [entries[n] for n in names]
    with open(path, "rb") as f:
        for entry in wanted:
            dtype = dtype_of(entry) if dtype_of is not None else None
            yield entry.name, read_tensor(path, entry, f, dtype=dtype, device=device)
