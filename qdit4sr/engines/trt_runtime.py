"""TensorRT backend of the segmented runtime: one deserialized engine per timestep segment.

    backend = TensorRTBackend(folder)                    # or TensorRTBackend(manifest, folder)
    velocity = backend.run(segment_index, {"hidden_states": ..., ..., "timestep": ...})

    runner = SegmentedRunner(folder, flavour="trt")       # the runtime imports this module on demand

Every engine listed in the manifest is deserialized once (the engines were built with AOT plugins,
so no plugin library and no Python plugin code is needed to load them). Device buffers are torch
CUDA tensors, allocated once per batch size and reused: all segment engines have the same inputs and
output (checked at load), so one buffer set per batch serves every segment, and each segment's
execution context is rebound only when the batch changes. Host arrays are copied in and the output
copied out on one torch CUDA stream, which is also the stream `execute_async_v3` runs on; no pycuda.

Importing this module registers the backend for the "trt" flavour in `qdit4sr.engines.runtime`'s registry.
Constructing it without TensorRT or a CUDA device raises `TensorRTUnavailable` with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifacts.flavour import Flavour
from ..artifacts.manifest import Manifest
from .build import InputSpec, TensorRTUnavailable, network_inputs, require_tensorrt

__all__ = ["TensorRTBackend", "TensorRTUnavailable", "check_feeds", "check_engine_io", "torch_dtype_for",
           "register_tensorrt_backend"]

# tensorrt.DataType member name -> torch dtype name
_TORCH_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                      "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def torch_dtype_for(trt_dtype: Any):
    """torch dtype of a tensorrt.DataType (or its name, e.g. "FLOAT")."""
    import torch

    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.split(".")[-1].upper()
    if name not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"no torch dtype for TensorRT type {name}; supported: {sorted(_TORCH_DTYPE_NAMES)}")
    return getattr(torch, _TORCH_DTYPE_NAMES[name])


def check_feeds(inputs: Sequence[InputSpec], feeds: Mapping[str, np.ndarray]) -> int:
    """The batch size of ``feeds`` after checking names, ranks, static sizes and one common batch."""
    expected = [s.name for s in inputs]
    missing = [n for n in expected if n not in feeds]
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise ValueError(f"feeds must be exactly {expected}; missing {missing}, unexpected {extra}")
    batch = None
    for spec in inputs:
        shape = tuple(np.shape(feeds[spec.name]))
        static = [d for d in spec.shape[1:]]
        if len(shape) != len(spec.shape) or list(shape[1:]) != static:
            raise ValueError(f"{spec.name} has shape {list(shape)}, the engines take [batch, "
                             f"{', '.join(map(str, static))}]")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(f"{spec.name} has batch {shape[0]}, the other inputs {batch}")
    if not batch:
        raise ValueError("the batch is empty")
    return batch


def check_engine_io(segment: int, inputs: Sequence[InputSpec], outputs: Sequence[InputSpec],
                    engine_io: Mapping[str, tuple]) -> list[str]:
    """Problems of one engine's I/O vs the manifest.

    ``engine_io`` maps each I/O tensor name to ("INPUT" | "OUTPUT", shape with -1 for dynamic axes)
    and optionally a third element, the tensorrt.DataType name ("FLOAT", ...).
    """
    problems = []
    for kind, specs in (("INPUT", inputs), ("OUTPUT", outputs)):
        have = {n for n, io in engine_io.items() if io[0] == kind}
        want = {s.name for s in specs}
        if have != want:
            problems.append(f"segment {segment}: engine {kind.lower()}s {sorted(have)} differ from the manifest's "
                            f"{sorted(want)}")
            continue
        for spec in specs:
            shape = tuple(engine_io[spec.name][1])
            expected = tuple(-1 if d == "batch" else int(d) for d in spec.shape)
            if shape != expected:
                problems.append(f"segment {segment}: {spec.name} has engine shape {list(shape)}, the manifest says "
                                f"{list(spec.shape)}")
            dtype = engine_io[spec.name][2] if len(engine_io[spec.name]) > 2 else None
            if dtype is not None and _TORCH_DTYPE_NAMES.get(dtype) != spec.dtype:
                problems.append(f"segment {segment}: {spec.name} is {dtype} in the engine, {spec.dtype} in the manifest")
    return problems


def _resolve(source: Manifest | str | Path, folder: str | Path | None, check_hashes: bool) -> tuple[Manifest, Path]:
    if isinstance(source, Manifest):
        if folder is None:
            raise ValueError("TensorRTBackend(manifest, folder): the folder the manifest describes is needed")
        return source, Path(folder)
    folder = Path(source)
    return Manifest.load(folder, check_hashes=check_hashes), folder


class TensorRTBackend:
    """`run(segment_index, feeds) -> velocity` on the segment engines of an exported folder."""

    def __init__(self, source: Manifest | str | Path, folder: str | Path | None = None, *, device: int = 0,
                 check_hashes: bool = True, register_python_plugins: bool = False):
        require_tensorrt("running TensorRT engines")
        self.manifest, self.folder = _resolve(source, folder, check_hashes)
        missing = [seg.index for seg in self.manifest.segments if seg.engine is None]
        if missing:
            raise ValueError(f"segments {missing} of {self.folder} have no TensorRT engine; build them with "
                             f"qdit4sr.engines.build.build_engines on a GPU machine")
        import tensorrt as trt
        import torch

        if register_python_plugins:  # only for engines built with JIT (Python) plugins
            from ..plugins.trt_plugins import register_plugins

            register_plugins()
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self.inputs = network_inputs(self.manifest)
        self.outputs = [InputSpec(t.name, tuple(t.shape), t.dtype) for t in self.manifest.outputs]
        self.output_name = self.outputs[0].name
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engines = [self._deserialize(seg.index, seg.engine.resolve(self.folder))
                            for seg in self.manifest.segments]
            self.contexts = [engine.create_execution_context() for engine in self.engines]
        self.batch_ranges = [self._batch_range(e) for e in self.engines]
        self._buffers: dict[int, dict[str, Any]] = {}   # batch -> name -> CUDA tensor
        self._bound: dict[int, int] = {}                # segment -> batch its context is bound to

    # -- loading -----------------------------------------------------------------------------------
    def _deserialize(self, segment: int, path: Path):
        # Python API page "Runtime": deserialize_cuda_engine(bytes) -> ICudaEngine or None.
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path.name} (segment {segment}): built with another "
                               f"TensorRT version or for another GPU? Rebuild it with build_engines")
        problems = check_engine_io(segment, self.inputs, self.outputs, self._engine_io(engine))
        if problems:
            raise RuntimeError("; ".join(problems))
        return engine

    def _engine_io(self, engine) -> dict[str, tuple[str, tuple[int, ...]]]:
        # Python API page "ICudaEngine": num_io_tensors, get_tensor_name, get_tensor_mode, get_tensor_shape.
        trt = self._trt
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "INPUT" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "OUTPUT"
            io[name] = (mode, tuple(engine.get_tensor_shape(name)), engine.get_tensor_dtype(name).name)
        return io

    def _batch_range(self, engine) -> tuple[int, int]:
        # get_tensor_profile_shape(name, profile_index) -> [min, opt, max] shapes.
        name = self.inputs[0].name
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        return int(lo[0]), int(hi[0])

    # -- running -----------------------------------------------------------------------------------
    def _buffers_for(self, batch: int) -> dict[str, Any]:
        if batch not in self._buffers:
            torch, engine = self._torch, self.engines[0]
            self._buffers[batch] = {
                spec.name: torch.empty(spec.concrete(batch), dtype=torch_dtype_for(engine.get_tensor_dtype(spec.name)),
                                       device=self.device)
                for spec in [*self.inputs, *self.outputs]}
        return self._buffers[batch]

    def _bind(self, segment: int, batch: int, buffers: Mapping[str, Any]) -> None:
        if self._bound.get(segment) == batch:
            return
        context = self.contexts[segment]
        for spec in self.inputs:
            if not context.set_input_shape(spec.name, spec.concrete(batch)):
                raise RuntimeError(f"segment {segment} rejected {spec.name} of shape {list(spec.concrete(batch))}")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        self._bound[segment] = batch

    def run(self, segment_index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not 0 <= segment_index < len(self.engines):
            raise IndexError(f"segment {segment_index} does not exist ({len(self.engines)} engines)")
        batch = check_feeds(self.inputs, feeds)
        lo, hi = self.batch_ranges[segment_index]
        if not lo <= batch <= hi:
            raise ValueError(f"batch {batch} is outside the engine's optimisation profile [{lo}, {hi}]; rebuild with "
                             f"EngineBuildConfig(batch_min=..., batch_max=...) or split the batch")
        torch = self._torch
        buffers = self._buffers_for(batch)
        self._bind(segment_index, batch, buffers)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for spec in self.inputs:
                host = torch.from_numpy(np.ascontiguousarray(feeds[spec.name]))
                buffers[spec.name].copy_(host.to(buffers[spec.name].dtype))
            # Python API page "IExecutionContext": execute_async_v3(stream_handle) -> bool.
            if not self.contexts[segment_index].execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to enqueue segment {segment_index}")
            out = buffers[self.output_name].to("cpu")  # waits for the stream
        return out.numpy()


def register_tensorrt_backend(register=None) -> None:
    """Register the backend for the trt flavour (with ``qdit4sr.engines.runtime.register_backend`` by default)."""
    if register is None:
        from .runtime import register_backend as register
    register(Flavour.TRT, TensorRTBackend)


register_tensorrt_backend()
