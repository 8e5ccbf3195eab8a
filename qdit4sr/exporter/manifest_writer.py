"""Writing `manifest.json`: the exporter describes the folder it wrote (the format is `qdit4sr.artifacts`).

    manifest = build_manifest(folder, exports, plan, model_hash=transformer_hash(model), ...)
    manifest.save(folder)        # last, once every file it names is in place
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..artifacts.graph_io import io_spec
from ..artifacts.manifest import (PLAN_FILE, PROMPT_FILE, TRANSFORMER_KEYS, FileRef, Manifest, ManifestError,
                                  SegmentEntry, TensorSpec, vae_graphs)
from ..calibration.plan import BitPlan
from ..fileio import atomic_write
from ..models.latents import PixelUnshuffleCodec, VAECodec
from ..models.pipeline import PipelineConfig, PromptEmbeddings


def transformer_hash(model: torch.nn.Module) -> str:
    """sha256 over the transformer config and state dict bytes; take it before quantizing the model."""
    digest = hashlib.sha256()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
              if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def codec_spec(codec, vae_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON description of a codec: the pixel-unshuffle parameters, or for a VAE the spec `export_vae`
    returned (its graphs, by names relative to the folder, and factors)."""
    if isinstance(codec, PixelUnshuffleCodec):
        return asdict(codec)
    if isinstance(codec, VAECodec) or getattr(codec, "kind", None) == "vae":
        if vae_spec is None:
            raise ValueError("a VAE codec is recorded by its exported graphs: call export_vae and pass its spec")
        try:
            vae_graphs(vae_spec)
        except ManifestError as e:
            raise ValueError(f"not an exported VAE spec: {e}") from e
        return vae_spec
    raise ValueError(f"unknown codec {type(codec).__name__}")


def precision_string(plan: BitPlan) -> str:
    return f"w{plan.config.weight_bits:g}a{plan.config.act_bits:g}"


def build_manifest(folder: str | Path, exports, plan: BitPlan, *, model_hash: str, pipeline_config: PipelineConfig,
                   codec, transformer_config, tile_latent: int, text_tokens: int,
                   prompt: PromptEmbeddings | None = None, vae_spec: dict[str, Any] | None = None,
                   precision: str | None = None) -> Manifest:
    """Write the plan (and prompt embeddings) beside the exported graphs and describe the folder.

    `exports` is the list returned by `export_segments` for this folder, `vae_spec` what `export_vae`
    returned for it when the codec is a VAE. The manifest is returned
    unsaved; call `.save(folder)` last, once every file it names is in place.
    """
    folder = Path(folder)
    if pipeline_config.tile_size != tile_latent:
        raise ValueError(f"pipeline tile_size {pipeline_config.tile_size} must equal the exported tile {tile_latent}")
    if pipeline_config.num_inference_steps != plan.num_steps:
        raise ValueError(f"the sampler runs {pipeline_config.num_inference_steps} steps, the plan covers "
                         f"{plan.num_steps}")
    plan.save(folder / PLAN_FILE)
    prompt_ref = None
    if prompt is not None:
        tensors = {k: v.detach().float().contiguous() for k, v in asdict(prompt).items() if v is not None}
        if tensors["prompt_embeds"].shape[1] != text_tokens:
            raise ValueError(f"prompt embeddings have {tensors['prompt_embeds'].shape[1]} tokens, the graphs take "
                             f"{text_tokens}")
        atomic_write(folder / PROMPT_FILE, lambda tmp: save_file(tensors, str(tmp)))
        prompt_ref = FileRef.of(folder, PROMPT_FILE)
    segments = [SegmentEntry(e.index, list(e.steps), list(e.timesteps),
                             {fl: FileRef(Path(p).name, e.graph_sha256[fl], (folder / Path(p).name).stat().st_size)
                              for fl, p in e.graphs.items()})
                for e in exports]
    weights = exports[0].weights if exports else None
    inputs, outputs = io_spec(transformer_config, tile_latent, text_tokens)
    return Manifest(
        model_hash=model_hash, precision=precision or precision_string(plan), plan=FileRef.of(folder, PLAN_FILE),
        sampler=asdict(pipeline_config), codec=codec_spec(codec, vae_spec),
        transformer={k: int(getattr(transformer_config, k)) for k in TRANSFORMER_KEYS},
        tile_latent=tile_latent, text_tokens=text_tokens, segments=segments,
        inputs=[TensorSpec(**t) for t in inputs], outputs=[TensorSpec(**t) for t in outputs],
        shared_weights=None if weights is None else FileRef(Path(weights).name, exports[0].weights_sha256,
                                                              (folder / Path(weights).name).stat().st_size),
        prompt_embeds=prompt_ref)
