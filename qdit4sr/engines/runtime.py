"""Run an exported folder: one session per timestep segment, switched by the sampler step.

    runner = SegmentedRunner(folder)                       # validates manifest.json first
    v = runner.run(step, hidden_states, controlnet_image, encoder_hidden_states, pooled_projections, timestep)
    pipe = load_exported_pipeline(folder, flavour="trt")   # DiT4SRPipeline whose transformer is the runner
    sr = pipe.upscale(image)                               # conditioned on the manifest's prompt embeddings
    sr = pipe.upscale(image, prompt=PromptEmbeddings.from_file("caption.safetensors"))   # per request

The flavour names the runtime backend, looked up in a registry. A backend is anything with
`run(segment_index, feeds: dict[str, np.ndarray]) -> np.ndarray` (the output velocity), built by a
factory `(manifest, folder, **options)`. "portable" and "cpu" (onnxruntime on those graphs) live here;
"trt" (the TensorRT engines) is imported on first use from `qdit4sr.engines.trt_runtime`, which
registers itself with `register_backend`. With no flavour named, `default_flavour` picks one.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..artifacts.flavour import Flavour
from ..artifacts.manifest import MANIFEST_FILE, Manifest, ManifestError, load_codec_spec
from ..models.pipeline import DiT4SRPipeline, PromptEmbeddings
from ..models.step_context import current_step
from .ort_options import session_options


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
    """One onnxruntime InferenceSession per segment, on the portable or the cpu graphs.

    The optimisation level defaults to the flavour's (ort_options.py): ORT_ENABLE_BASIC for the
    portable graphs, which then run exactly as written, ORT_ENABLE_ALL for the cpu graphs, which exist
    to be fused into integer matmuls (exact too: their INT8 codes cannot saturate any x86 kernel).
    """

    def __init__(self, manifest: Manifest, folder: Path, providers: list[str] | None = None,
                 graph_optimization_level: str | None = None, intra_op_num_threads: int | None = None,
                 flavour: Flavour | str = Flavour.PORTABLE):
        import onnxruntime as ort

        flavour = Flavour.parse(flavour)
        if flavour not in manifest.flavours:
            raise ValueError(f"the folder has no {str(flavour)!r} graphs (it has {manifest.flavours})")
        options = session_options(flavour, intra_op_num_threads, graph_optimization_level)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.flavour = flavour
        self.providers = providers
        self.sessions = [ort.InferenceSession(str(seg.graphs[flavour].resolve(folder)), options, providers=providers)
                         for seg in manifest.segments]
        self.output_name = manifest.outputs[0].name

    def run(self, segment_index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[segment_index].run([self.output_name], feeds)[0]


register_backend(Flavour.PORTABLE, functools.partial(OrtBackend, flavour=Flavour.PORTABLE))
register_backend(Flavour.CPU, functools.partial(OrtBackend, flavour=Flavour.CPU))


def default_flavour(manifest: Manifest) -> Flavour:
    """trt where the folder has engines and TensorRT runs here; otherwise cpu (onnxruntime's integer
    graphs) when the folder has them, else portable."""
    if manifest.segments and all(seg.engine is not None for seg in manifest.segments):
        from .build import tensorrt_status

        if tensorrt_status()[0]:
            return Flavour.TRT
    for flavour in (Flavour.CPU, Flavour.PORTABLE):
        if flavour in manifest.flavours:
            return flavour
    raise ValueError(f"the folder has no graphs this machine can run (it has {manifest.flavours}); "
                     f"export the cpu or portable flavour")


# ----------------------------------------------------------------------------- runner

def _unvalidated_manifest(folder: Path) -> Manifest:
    """The manifest as written, only to choose a flavour; the runner then validates what that flavour reads."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {folder}")
    return Manifest.from_json(path.read_text())


class SegmentedRunner:
    """Loads a validated exported folder and runs the segment that owns each sampler step."""

    def __init__(self, folder: str | Path, flavour: Flavour | str | None = None,
                 providers: list[str] | None = None, check_hashes: bool = True, *,
                 manifest: Manifest | None = None, backend: SegmentBackend | None = None, **backend_options):
        self.folder = Path(folder)
        # A caller that validated the manifest its own way and runs the segments elsewhere (a serving
        # model whose graphs live in other models) passes both in. Otherwise only the files this
        # flavour's runtime reads must be there: a folder stripped of another flavour's graphs still
        # runs, and everything it does read is checked in full.
        if manifest is None:
            if flavour is None:
                flavour = default_flavour(_unvalidated_manifest(self.folder))
            # A backend registered under another name gets every file checked.
            scope = (flavour,) if str(flavour) in Flavour.names() else None
            manifest = Manifest.load(self.folder, check_hashes=check_hashes, flavours=scope)
        self.manifest = manifest
        self.flavour = default_flavour(self.manifest) if flavour is None else flavour
        if backend is None:
            if providers is not None:
                backend_options["providers"] = providers
            backend = get_backend(self.flavour)(self.manifest, self.folder, **backend_options)
        self.backend: SegmentBackend = backend
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
    """Stands in for the torch transformer inside DiT4SRPipeline; the segment follows `current_step()`.

    `text_tokens`: the graphs' fixed text length, which the pipeline checks per-request prompts against."""

    def __init__(self, runner: SegmentedRunner):
        self.runner = runner
        self.config = ExportedTransformerConfig(**runner.manifest.transformer)
        self.text_tokens = runner.manifest.text_tokens

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


def load_exported_pipeline(folder: str | Path, flavour: Flavour | str | None = None,
                           **runner_options) -> DiT4SRPipeline:
    """The sampler rebuilt from the manifest (codec, settings, prompt) around the exported graphs of `flavour`
    (None: `default_flavour`). Its `upscale(..., prompt=)` takes other prompt embeddings per call; with a
    negative pair and the manifest's guidance > 1 it runs CFG, as calibration did."""
    runner = SegmentedRunner(folder, flavour=flavour, **runner_options)
    manifest = runner.manifest
    transformer = OrtTransformer(runner)
    if manifest.prompt_embeds is not None:
        prompt = PromptEmbeddings.from_file(manifest.prompt_embeds.resolve(runner.folder))
    else:
        cfg = transformer.config
        prompt = PromptEmbeddings.null(cfg.joint_attention_dim, cfg.pooled_projection_dim, tokens=manifest.text_tokens)
    # A VAE codec runs its exported graphs on the segments' onnxruntime providers (else onnxruntime's default).
    codec = load_codec_spec(manifest.codec, runner.folder, providers=getattr(runner.backend, "providers", None),
                            intra_op_num_threads=runner_options.get("intra_op_num_threads"))
    return DiT4SRPipeline(transformer, codec, manifest.pipeline_config(), prompt)
