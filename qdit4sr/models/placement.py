"""Where and in which dtype the transformer computes during calibration and quantization.

    placement = DeviceConfig(device="cuda", dtype="bfloat16", offload=True)
    with place(model, placement):    # model in bf16; blocks visit the GPU one at a time
        ...                          # calibration forwards
    peak_device_bytes(placement)     # what the device needed at most

Without `offload` the whole model moves to the device. With it the model stays in host memory and
each transformer block is moved to the device just before its forward and back right after, so a
2.7 B model calibrates on a GPU that holds one block plus activations. The small modules outside
the blocks (embeddings, final norm and projection) stay on the device for the whole run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"          # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"       # the model's compute dtype: float32, bfloat16 or float16
    offload: bool = False        # keep the model in host memory, one block at a time on the device

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a device name (cpu, cuda, cuda:N)") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.offload and device.type == "cpu":
            raise ValueError("offload moves blocks from host memory to an accelerator; it needs a cuda device")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_available(self) -> None:
        """Raise ValueError with the reason when the device cannot be used here."""
        device = self.torch_device
        if device.type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ValueError(f"device {self.device} was asked for, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move parameters and buffers one tensor at a time (peak: the module plus one tensor), floats to dtype."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                target = dtype if dtype is not None and t.is_floating_point() else t.dtype
                if t.device == device and t.dtype == target:
                    continue
                moved = t.detach().to(device=device, dtype=target)
                store[name] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved


def cast_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Convert floating parameters and buffers to dtype in place, one tensor at a time."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    moved = t.detach().to(dtype)
                    store[name] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return module


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError("offload needs a model with transformer_blocks")
    return list(blocks)


@contextlib.contextmanager
def place(model: nn.Module, config: DeviceConfig) -> Iterator[nn.Module]:
    """Put the model on the configured device and dtype; with offload, hook each block in and out.

    The dtype stays after the context (the caller chose it); the hooks are removed and, with offload,
    every block is back in host memory.
    """
    config.check_available()
    device, dtype = config.torch_device, config.torch_dtype
    if not config.offload:
        _move(model, device, dtype)
        yield model
        return
    blocks = _blocks(model)
    block_ids = {id(b) for b in blocks}
    cast_(model, dtype)
    for name, child in model.named_children():
        if name != "transformer_blocks" and id(child) not in block_ids:
            _move(child, device)
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args: _move(m, device)))
        handles.append(block.register_forward_hook(lambda m, args, out: _move(m, torch.device("cpu"))))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        _move(model, torch.device("cpu"))


def reset_peak(config: DeviceConfig) -> None:
    if config.torch_device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(config.torch_device)


def peak_device_bytes(config: DeviceConfig) -> int | None:
    """Peak bytes allocated by torch on the device since the last reset; None on the CPU."""
    if config.torch_device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(config.torch_device))


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for parameterless stand-ins)."""
    for p in getattr(model, "parameters", lambda: iter(()))():
        return p.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 for parameterless stand-ins)."""
    for p in getattr(model, "parameters", lambda: iter(()))():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
