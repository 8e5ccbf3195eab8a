"""One TensorRT engine per timestep segment, built from the segment's trt-flavour ONNX graph.

    available, reason = tensorrt_status()          # what the export CLI reports when it cannot build
    paths = build_engines(folder, EngineBuildConfig(batch_max=8))

`build_engines` needs the `tensorrt` package (>= 10.9, for AOT Python plugins), `triton` (to compile
the plugin kernels to PTX) and a CUDA device; otherwise it raises `TensorRTUnavailable` naming what is
missing. Per segment it registers the qdit4sr plugins, parses the graph with the ONNX parser into a
strongly typed network (explicit Q/DQ: no precision flags), sets one optimisation profile over the batch
axis (every other axis is static: the exported tile), builds with a timing cache shared by all segments
(loaded from and saved to `config.timing_cache_path`), and writes `segment_<kk>.plan` beside the
manifest atomically. The plugin nodes carry `aot=1`, so their PTX is compiled into the engine and the
engine runs without Python: `trtexec --loadEngine` or a C++ `IRuntime::deserializeCudaEngine`, no plugin
library. Finally the engines are recorded in `manifest.json` (`SegmentEntry.engine`, with sha256).

The TensorRT calls are the small `_trt_*` functions at the end, each naming the documentation page of
the TensorRT Python API it follows; everything else is plain Python and tested without TensorRT.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..artifacts.flavour import ENGINE_FLAVOUR
from ..artifacts.graph_io import BATCH_AXIS
from ..artifacts.manifest import FileRef, Manifest, engine_file_name
from ..checks import check_int, is_int
from ..fileio import atomic_write

__all__ = [
    "MIN_TENSORRT_VERSION",
    "TensorRTUnavailable",
    "EngineBuildConfig",
    "InputSpec",
    "ProfileShapes",
    "tensorrt_status",
    "require_tensorrt",
    "engine_file_name",
    "network_inputs",
    "optimization_profile_shapes",
    "record_engines",
    "build_engines",
]

MIN_TENSORRT_VERSION = (10, 9)  # tensorrt.plugin.aot_impl
DEFAULT_TIMING_CACHE = "timing.cache"


class TensorRTUnavailable(RuntimeError):
    """TensorRT engines cannot be built or run here; the message says why."""


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class EngineBuildConfig:
    """Builder settings shared by every segment's engine.

    ``tile_latent`` / ``text_tokens`` None take the exported graphs' static sizes from the manifest;
    given, they must agree with it (the graphs are exported for one tile size). ``timing_cache_path``
    None means ``<folder>/timing.cache``.
    """

    workspace_bytes: int = 4 << 30
    tile_latent: int | None = None
    batch_min: int = 1
    batch_opt: int = 2            # classifier-free guidance: uncond + cond of one tile
    batch_max: int = 32           # 2 x PipelineConfig.tile_batch
    text_tokens: int | None = None
    builder_optimization_level: int = 3
    timing_cache_path: str | None = None

    def __post_init__(self):
        for name in ("workspace_bytes", "batch_min", "batch_opt", "batch_max"):
            check_int(name, getattr(self, name))
        if not self.batch_min <= self.batch_opt <= self.batch_max:
            raise ValueError(f"need batch_min <= batch_opt <= batch_max, got {self.batch_min}, {self.batch_opt}, "
                             f"{self.batch_max}")
        for name in ("tile_latent", "text_tokens"):
            check_int(name, getattr(self, name), optional=True)
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level must lie in 0..5, got {self.builder_optimization_level}")

    def timing_cache(self, folder: str | Path) -> Path:
        return Path(self.timing_cache_path) if self.timing_cache_path else Path(folder) / DEFAULT_TIMING_CACHE


@dataclass(frozen=True)
class InputSpec:
    """One network input: static sizes as ints, the dynamic batch axis as the string "batch"."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def batch_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if d == BATCH_AXIS)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH_AXIS else int(d) for d in self.shape)


@dataclass(frozen=True)
class ProfileShapes:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# ----------------------------------------------------------------------------- availability

def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _cuda_device_problem() -> str | None:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return f"torch is not importable ({e}), so no CUDA device can be used"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        return f"no CUDA device is visible (torch.cuda.is_available() is False; {build})"
    return None


def tensorrt_status(import_module: Callable[[str], Any] = importlib.import_module,
                    cuda_problem: Callable[[], str | None] = _cuda_device_problem) -> tuple[bool, str]:
    """(available, reason): whether TensorRT engines can be built and run here, and if not, why.

    Checks, reporting every failure: ``import tensorrt`` (>= 10.9), ``import tensorrt.plugin``,
    ``import triton`` (the plugin kernels are compiled to PTX with it), and a visible CUDA device.
    The arguments exist for tests.
    """
    problems = []
    try:
        trt = import_module("tensorrt")
    except ImportError as e:
        problems.append(f"the tensorrt Python package is not importable ({e}); install it with "
                        f"pip install 'qdit4sr[tensorrt]' on a machine with an NVIDIA GPU")
    else:
        version = getattr(trt, "__version__", "0")
        if _version_tuple(version) < MIN_TENSORRT_VERSION:
            problems.append(f"tensorrt {version} is too old: AOT Python plugins need >= "
                            f"{'.'.join(map(str, MIN_TENSORRT_VERSION))}")
        try:
            import_module("tensorrt.plugin")
        except ImportError as e:
            problems.append(f"tensorrt.plugin is not importable ({e})")
    try:
        import_module("triton")
    except ImportError as e:
        problems.append(f"triton is not importable ({e}); install it with pip install 'qdit4sr[triton]'")
    problem = cuda_problem()
    if problem:
        problems.append(problem)
    if problems:
        return False, "; ".join(problems)
    return True, f"tensorrt {getattr(trt, '__version__', '?')} with a CUDA device"


def require_tensorrt(what: str = "building TensorRT engines") -> None:
    available, reason = tensorrt_status()
    if not available:
        raise TensorRTUnavailable(f"{what} is not possible here: {reason}")


# ----------------------------------------------------------------------------- pure helpers

def _input_specs(source: Manifest | str | Path | Mapping | Sequence) -> list[InputSpec]:
    if isinstance(source, (str, Path)):
        source = Manifest.load(source, check_hashes=False)
    if isinstance(source, Manifest):
        return [InputSpec(t.name, tuple(t.shape), t.dtype) for t in source.inputs]
    if isinstance(source, Mapping):
        return [InputSpec(name, tuple(shape)) for name, shape in source.items()]
    specs = []
    for item in source:
        if isinstance(item, InputSpec):
            specs.append(item)
        elif isinstance(item, Mapping):
            specs.append(InputSpec(str(item["name"]), tuple(item["shape"]), str(item.get("dtype", "float32"))))
        else:  # manifest TensorSpec or anything alike
            specs.append(InputSpec(item.name, tuple(item.shape), getattr(item, "dtype", "float32")))
    return specs


def network_inputs(source: Manifest | str | Path | Mapping | Sequence,
                   config: EngineBuildConfig | None = None) -> list[InputSpec]:
    """The engine inputs of an exported folder: a Manifest, its folder, {name: shape} or a list of specs.

    Every input must have exactly one axis, the first, named "batch"; every other axis must be a
    positive int. With ``config``, its tile_latent / text_tokens must match the static sizes.
    """
    specs = _input_specs(source)
    if not specs:
        raise ValueError("the graphs declare no inputs")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate input names in {names}")
    for spec in specs:
        if spec.batch_axes != (0,):
            raise ValueError(f"input {spec.name} has shape {list(spec.shape)}: exactly its first axis must be the "
                             f"dynamic {BATCH_AXIS!r} axis")
        bad = [d for d in spec.shape[1:] if not is_int(d) or d <= 0]
        if bad:
            raise ValueError(f"input {spec.name} has shape {list(spec.shape)}: axes other than {BATCH_AXIS!r} must be "
                             f"positive ints (the graphs are exported for one tile size)")
    if config is not None:
        _check_static_sizes(specs, config)
    return specs


def _check_static_sizes(specs: Sequence[InputSpec], config: EngineBuildConfig) -> None:
    by_name = {s.name: s for s in specs}
    if config.tile_latent is not None:
        for name in ("hidden_states", "controlnet_image"):
            if name in by_name and tuple(by_name[name].shape[2:]) != (config.tile_latent, config.tile_latent):
                raise ValueError(f"tile_latent={config.tile_latent} but the graphs take {name} of shape "
                                 f"{list(by_name[name].shape)}; re-export for another tile size")
    if config.text_tokens is not None and "encoder_hidden_states" in by_name:
        tokens = by_name["encoder_hidden_states"].shape[1]
        if tokens != config.text_tokens:
            raise ValueError(f"text_tokens={config.text_tokens} but the graphs take {tokens} text tokens")


def optimization_profile_shapes(inputs: Iterable[InputSpec] | Manifest | Mapping,
                                config: EngineBuildConfig) -> dict[str, ProfileShapes]:
    """(min, opt, max) shape per input for the single optimisation profile: the batch axis varies."""
    specs = network_inputs(inputs, config)
    return {s.name: ProfileShapes(s.concrete(config.batch_min), s.concrete(config.batch_opt),
                                  s.concrete(config.batch_max)) for s in specs}


def _trt_graph(manifest: Manifest, folder: Path, segment: int) -> Path:
    seg = manifest.segments[segment]
    if ENGINE_FLAVOUR not in seg.graphs:
        raise ValueError(f"segment {segment} has no {ENGINE_FLAVOUR.value!r} graph (flavours: {sorted(seg.graphs)}); "
                         f"export with --flavour {ENGINE_FLAVOUR}")
    return seg.graphs[ENGINE_FLAVOUR].resolve(folder)


def record_engines(folder: str | Path, engines: Mapping[int, str | Path]) -> Manifest:
    """Record built engine files (segment index -> path inside the folder) in manifest.json, with sha256."""
    folder = Path(folder)
    manifest = Manifest.load(folder, check_hashes=False)
    for index, path in engines.items():
        if not 0 <= index < len(manifest.segments):
            raise ValueError(f"segment {index} does not exist (the manifest has {len(manifest.segments)})")
        manifest.segments[index].engine = FileRef.of(folder, Path(path).resolve().relative_to(folder.resolve()))
    manifest.save(folder)
    return manifest


# ----------------------------------------------------------------------------- build

def build_engines(folder: str | Path, config: EngineBuildConfig | None = None, *,
                  segments: Sequence[int] | None = None, check_hashes: bool = True,
                  update_manifest: bool = True, verbose: bool = False) -> list[Path]:
    """Build `segment_<kk>.plan` for every (or the given) segment of an exported folder; returns the paths.

    Raises TensorRTUnavailable (why) without TensorRT / triton / a CUDA device, ManifestError for a
    broken folder, RuntimeError naming the segment when TensorRT fails to parse or build.
    """
    config = config or EngineBuildConfig()
    require_tensorrt()
    folder = Path(folder)
    manifest = Manifest.load(folder, check_hashes=check_hashes)
    indices = list(range(len(manifest.segments))) if segments is None else list(segments)
    graphs = {k: _trt_graph(manifest, folder, k) for k in indices}
    shapes = optimization_profile_shapes(network_inputs(manifest, config), config)

    import tensorrt as trt

    from ..plugins.trt_plugins import register_plugins

    register_plugins()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = config.timing_cache(folder)
    cache = None
    built: dict[int, Path] = {}
    for k in indices:
        network = _trt_create_network(trt, builder)
        _trt_parse_onnx(trt, network, logger, graphs[k], segment=k)
        builder_config = _trt_builder_config(trt, builder, config)
        _trt_add_profile(builder, builder_config, shapes)
        if cache is None:
            cache = _trt_load_timing_cache(builder_config, cache_path)
        _trt_use_timing_cache(builder_config, cache)
        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build the engine of segment {k} from {graphs[k].name}; "
                               f"rerun with verbose=True for the builder log")
        target = folder / engine_file_name(k)
        atomic_write(target, lambda tmp, data=serialized: Path(tmp).write_bytes(memoryview(data)))
        built[k] = target
        del network, builder_config, serialized
    if cache is not None:
        _trt_save_timing_cache(cache, cache_path)
    if update_manifest:
        record_engines(folder, built)
    return [built[k] for k in indices]


# ----------------------------------------------------------------------------- TensorRT calls
# Python API reference pages: "Builder" (create_network, NetworkDefinitionCreationFlag,
# build_serialized_network, create_optimization_profile), "OnnxParser", "IBuilderConfig"
# (set_memory_pool_limit, builder_optimization_level, add_optimization_profile, create_timing_cache,
# set_timing_cache), "ITimingCache" (serialize), "IOptimizationProfile" (set_shape).

def _trt_create_network(trt, builder):
    """Strongly typed network (TensorRT 10: opt-in flag; 11: always, the flag is accepted and ignored).
    PREFER_AOT_PYTHON_PLUGINS (10.9+) picks aot_impl for plugins that have both implementations."""
    flags = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return builder.create_network(flags)


def _trt_parse_onnx(trt, network, logger, path: Path, segment: int) -> None:
    """parse_from_file resolves the external weights (weights.bin) relative to the graph's folder."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected segment {segment} ({path.name}):\n  " + "\n  ".join(errors))


def _trt_builder_config(trt, builder, config: EngineBuildConfig):
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    builder_config.builder_optimization_level = config.builder_optimization_level
    return builder_config


def _trt_add_profile(builder, builder_config, shapes: Mapping[str, ProfileShapes]) -> None:
    profile = builder.create_optimization_profile()
    for name, s in shapes.items():
        profile.set_shape(name, s.min, s.opt, s.max)
    builder_config.add_optimization_profile(profile)


def _trt_load_timing_cache(builder_config, path: Path):
    """One timing cache for all segments: the tactics timed for segment 0 are reused by the others."""
    data = path.read_bytes() if path.is_file() else b""
    return builder_config.create_timing_cache(data)


def _trt_use_timing_cache(builder_config, cache) -> None:
    builder_config.set_timing_cache(cache, ignore_mismatch=False)


def _trt_save_timing_cache(cache, path: Path) -> None:
    data = bytes(memoryview(cache.serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def config_summary(config: EngineBuildConfig) -> str:
    """One JSON line describing a build configuration (for logs)."""
    return json.dumps(asdict(config), sort_keys=True)
