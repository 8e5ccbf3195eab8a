"""Quantized micro models (random weights, tiny calibration) and their exported folders, for the export,
manifest and runtime tests. Independent of the shipped default model."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch

from qdit4sr.artifacts.manifest import Manifest
from qdit4sr.calibration.api import quantize_
from qdit4sr.calibration.layers import example_inputs, used_linears
from qdit4sr.calibration.plan import BitPlan, QDiT4SRConfig
from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats
from qdit4sr.exporter.manifest_writer import build_manifest, transformer_hash
from qdit4sr.exporter.onnx_export import SegmentExport, export_segments
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig, PromptEmbeddings
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize

TILE, TOKENS = 8, 3
PIPE = PipelineConfig(num_inference_steps=4, shift=1.0, guidance_scale=1.0, tile_size=TILE, tile_overlap=2,
                      tile_batch=16, min_lr_side=4, color_fix="adain")


@contextlib.contextmanager
def single_thread():
    """One torch thread: on a shared 2-core machine, 2 OpenMP threads make small SVDs ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    """One-thread CPU session at ORT_ENABLE_BASIC: computes exactly what the graph says."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class QuantizedMicro:
    model: DiT4SRTransformer2DModel
    plan: BitPlan
    pipeline: DiT4SRPipeline
    model_hash: str


@torch.no_grad()
def quantized_micro(preset: str, precision: str, *, boost: tuple[str, ...] = (), seed: int = 0,
                    model_config: dict | None = None, **overrides) -> QuantizedMicro:
    """A micro DiT4SR quantized in place; `boost` layers get 8x weights so VaSMP gives them more bits."""
    with single_thread():
        model = randomize(DiT4SRTransformer2DModel(**{**MICRO_CONFIG, **(model_config or {})}), seed=seed).eval()
        for name in boost:
            model.get_submodule(name).weight.mul_(8.0)
        model_hash = transformer_hash(model)
        gen = torch.Generator().manual_seed(seed + 7)
        prompt = PromptEmbeddings(torch.randn(1, TOKENS, MICRO_CONFIG["joint_attention_dim"], generator=gen),
                                  torch.randn(1, MICRO_CONFIG["pooled_projection_dim"], generator=gen))
        pipe = DiT4SRPipeline(model, PixelUnshuffleCodec(), PIPE, prompt)
        layers = used_linears(model, example_inputs(model))
        stats = collect_activation_stats(pipe, layers, CalibrationConfig(num_images=2, lr_crop=4, batch_size=2),
                                         progress=False)
        plan = quantize_(model, QDiT4SRConfig.preset(preset, precision, **overrides), stats, progress=False)
    return QuantizedMicro(model, plan, pipe, model_hash)


def export_micro(q: QuantizedMicro, folder: Path, flavour: str = "portable") -> tuple[list[SegmentExport], Manifest]:
    """Export the graphs and write the manifest, as the export command does."""
    with single_thread():
        exports = export_segments(q.model, q.plan, folder, TILE, TOKENS, flavour=flavour, progress=False)
    manifest = build_manifest(folder, exports, q.plan, model_hash=q.model_hash, pipeline_config=PIPE,
                              codec=q.pipeline.codec, transformer_config=q.model.config, tile_latent=TILE,
                              text_tokens=TOKENS, prompt=q.pipeline.prompt)
    manifest.save(folder)
    return exports, manifest
