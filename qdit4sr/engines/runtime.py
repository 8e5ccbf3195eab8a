"""Run an exported folder: one session per timestep segment, switched by the sampler step.

    runner = SegmentedRunner(folder)                       # validates manifest.json first
    v = runner.run(step, hidden_states, controlnet_image, encoder_hidden_states, pooled_projections, timestep)
    pipe = load_exported_pipeline(folder, flavour="trt")   # DiT4SRPipeline whose transformer is the runner
    sr = pipe.upscale(image)

The flavour names the runtime backend, looked up in a registry. A backend is anything with
`run(segment_index, feeds: dict[str, np.ndarray]) -> np.ndarray` (the output velocity), built by a
factory `(manifest, folder, **options)`. "portable" (onnxruntime on the portable graphs) lives here;
"trt" (the TensorRT engines) is imported on first use from `qdit4sr.engines.trt_runtime`, which
registers itself with `register_backend`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..artifacts.flavour import Flavour
from ..artifacts.manifest import Manifest, load_codec_spec
from ..models.pipeline import DiT4SRPipeline, PromptEmbeddings
from ..models.step_context import current_step


class SegmentBackend(Protocol):
    """What a runtime backend implements: one forward of segment `segment_index`'s graph or engine."""

    def run(self, segment_index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ...


BackendFactory = Callable[..., SegmentBackend]  # (manifest, folder, **options) -> backend
_BACKENDS: dict[str, BackendFactory] = {}       # flavour -> backend factory
# Backends that live in modules of their own, imported only when asked for (they need extra packages).
_LAZY_BACKENDS = {Flavour.TRT: "qdit4sr.engines.trt_runtime"}


def register_backend(flavour: Flavour | str, factory: BackendFactory) -> None:
    _BACKENDS[flavour] = factory


def get_backend(flavour: Flavour | str) -> BackendFactory:
    """The backend factory that runs `flavour` (importing its module on first use)."""
    if flavour not in _BACKENDS and flavour in _LAZY_BACKENDS:
        try:
            importlib.import_module(_LAZY_BACKENDS[flavour])
        except ImportError as e:
            raise RuntimeError(f"the {flavour!s} runtime is unavailable here ({_LAZY_BACKENDS[flavour]}: {e})") from e
    if flavour not in _BACKENDS:
        raise ValueError(f"no runtime backend for flavour {str(flavour)!r}; available: "
                         f"{sorted(str(f) for f in set(_BACKENDS) | set(_LAZY_BACKENDS))}")
    return _BACKENDS[flavour]


# ----------------------------------------------------------------------------- onnxruntime

class OrtBackend:
    """One onnxruntime InferenceSession per segment, on the portable graphs.

    The default optimisation level is ORT_ENABLE_BASIC: the extended levels fuse Q/DQ + MatMul into
    integer kernels that can be inexact on CPUs without VNNI, while the basic level computes exactly
    what the graph says (constant folding and eliminations only).
    """

    def __init__(self, manifest: Manifest, folder: Path, providers: list[str] | None = None,
                 graph_optimization_level: str = "ORT_ENABLE_BASIC", intra_op_num_threads: int | None = None,
                 flavour: Flavour | str = Flavour.PORTABLE):
        import onnxruntime as ort

        if flavour not in manifest.flavours:
            raise ValueError(f"the folder has no {flavour!r} graphs (it has {manifest.flavours})")
        options = ort.SessionOptions()
        try:
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization_level)
        except AttributeError as e:
            raise ValueError(f"unknown graph_optimization_level {graph_optimization_level!r}") from e
        if intra_op_num_threads:
            options.intra_op_num_threads = int(intra_op_num_threads)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = providers
        self.sessions = [ort.InferenceSession(str(seg.graphs[flavour].resolve(folder)), options, providers=providers)
                         for seg in manifest.segments]
        self.output_name = manifest.outputs[0].name

    def run(self, segment_index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[segment_index].run([self.output_name], feeds)[0]


register_backend(Flavour.PORTABLE, OrtBackend)


# ----------------------------------------------------------------------------- runner

class SegmentedRunner:
    """Loads a validated exported folder and runs the segment that owns each sampler step."""

    def __init__(self, folder: str | Path, flavour: Flavour | str = Flavour.PORTABLE,
                 providers: list[str] | None = None, check_hashes: bool = True, **backend_options):
        self.folder = Path(folder)
        # Only the files this flavour's runtime reads must be there: a folder stripped of the other
        # flavour's graphs still runs, and everything it does read is checked in full.
        self.manifest = Manifest.load(self.folder, check_hashes=check_hashes, flavours=(flavour,))
        factory = get_backend(flavour)
        if providers is not None:
            backend_options["providers"] = providers
        self.backend: SegmentBackend = factory(self.manifest, self.folder, **backend_options)
        self.input_names = [t.name for t in self.manifest.inputs]

    @property
    def num_steps(self) -> int:
        return self.manifest.num_steps

    def segment_of_step(self, step_index: int) -> int:
        return self.manifest.segment_of_step(step_index)

    def _feeds(self, arrays: tuple) -> dict[str, np.ndarray]:
        feeds = {}
        batch = None
        for spec, value in zip(self.manifest.inputs, arrays):
            a = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value,
                                     dtype=np.float32)
            expected = spec.shape[1:]
            if list(a.shape[1:]) != expected or a.ndim != len(spec.shape):
                raise ValueError(f"{spec.name} has shape {list(a.shape)}, the exported graph takes "
                                 f"[batch, {', '.join(map(str, expected))}]")
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise ValueError(f"{spec.name} has batch {a.shape[0]}, the other inputs {batch}")
            feeds[spec.name] = a
        return feeds

    def run(self, step_index: int, hidden_states, controlnet_image, encoder_hidden_states, pooled_projections,
            timestep) -> np.ndarray:
        """Velocity [B, C, h, w] for one transformer call of sampler step `step_index`."""
        feeds = self._feeds((hidden_states, controlnet_image, encoder_hidden_states, pooled_projections, timestep))
        return self.backend.run(self.segment_of_step(step_index), feeds)


# ----------------------------------------------------------------------------- sampler adapter

@dataclass(frozen=True)
class ExportedTransformerConfig:
    """The transformer config fields DiT4SRPipeline reads."""

    patch_size: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int
    pooled_projection_dim: int


class OrtTransformer:
    """Stands in for the torch transformer inside DiT4SRPipeline; the segment follows `current_step()`."""

    def __init__(self, runner: SegmentedRunner):
        self.runner = runner
        self.config = ExportedTransformerConfig(**runner.manifest.transformer)

    def eval(self) -> "OrtTransformer":
        return self

    def __call__(self, *args) -> torch.Tensor:
        return self.forward(*args)

    def forward(self, hidden_states: torch.Tensor, controlnet_image: torch.Tensor,
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        step = current_step()
        if step is None:
            if len(self.runner.manifest.segments) > 1:
                raise RuntimeError("the exported transformer has several timestep segments and was called outside "
                                   "the sampler; wrap the call in qdit4sr.models.step_context.step_scope(i)")
            step = 0
        out = self.runner.run(step, hidden_states, controlnet_image, encoder_hidden_states, pooled_projections,
                              timestep)
        return torch.from_numpy(out).to(hidden_states.dtype)


def load_exported_pipeline(folder: str | Path, flavour: Flavour | str = Flavour.PORTABLE,
                           **runner_options) -> DiT4SRPipeline:
    """The sampler rebuilt from the manifest (codec, settings, prompt) around the exported graphs of `flavour`."""
    runner = SegmentedRunner(folder, flavour=flavour, **runner_options)
    manifest = runner.manifest
    transformer = OrtTransformer(runner)
    if manifest.prompt_embeds is not None:
        prompt = PromptEmbeddings.from_file(manifest.prompt_embeds.resolve(runner.folder))
    else:
        cfg = transformer.config
        prompt = PromptEmbeddings.null(cfg.joint_attention_dim, cfg.pooled_projection_dim, tokens=manifest.text_tokens)
    codec = load_codec_spec(manifest.codec, runner.folder)
    return DiT4SRPipeline(transformer, codec, manifest.pipeline_config(), prompt)
