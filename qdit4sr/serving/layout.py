"""Names and places inside a generated Triton model repository, shared by the writer and the served models.

    MODEL_REPO/
      <prefix>_upscale/config.pbtxt            Python backend (BLS): image + seed -> SR image
      <prefix>_upscale/1/model.py
      <prefix>_upscale/1/export/               manifest.json, bit plan, prompt embeddings (+ VAE folder)
      <prefix>_segment_<kk>/config.pbtxt       one model per timestep segment, dynamic batching
      <prefix>_segment_<kk>/1/model.onnx + weights.bin   (python / onnxruntime forms)
      <prefix>_segment_<kk>/1/model.plan                 (tensorrt_plan form)
      <prefix>_segment_<kk>/1/model.py                   (python form)

Light on imports: the segment models' stub processes import this module.
"""
from __future__ import annotations

from pathlib import Path

VERSION = "1"
EXPORT_SUBDIR = "export"
MODEL_PY = "model.py"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
REPOSITORY_RECORD = "qdit4sr_repository.json"

IMAGE_INPUT, SEED_INPUT, IMAGE_OUTPUT = "image", "seed", "sr_image"

# model config parameters read by the Python models
PARAM_SEGMENT_MODELS = "segment_models"
PARAM_TORCH_THREADS = "torch_threads"
PARAM_INTRA_OP_THREADS = "intra_op_num_threads"


def upscale_model_name(prefix: str) -> str:
    return f"{prefix}_upscale"


def segment_model_name(prefix: str, index: int) -> str:
    return f"{prefix}_segment_{index:02d}"


def per_item_scalar(spec) -> bool:
    """An input whose only axis is the batch axis (the timestep): Triton needs dims [1] + reshape []."""
    return len(spec.shape) == 1


def load_serving_manifest(folder: str | Path):
    """The manifest in an upscale model's export folder, with the files that model reads verified.

    The segment graphs live in the segment models, so `Manifest.load` (which checks every file) does
    not apply here: the bit plan, prompt embeddings and VAE graphs are checked (size and sha256), and the sampler
    settings and segment layout are validated.
    """
    from ..artifacts.manifest import MANIFEST_FILE, Manifest, ManifestError, codec_files

    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {folder}")
    manifest = Manifest.from_json(path.read_text())
    manifest.plan.verify(folder, "bit plan")
    if manifest.prompt_embeds is not None:
        manifest.prompt_embeds.verify(folder, "prompt embeddings")
    for part, ref in codec_files(manifest.codec).items():
        ref.verify(folder, f"VAE {part} graph")
    manifest.pipeline_config()
    if [s.index for s in manifest.segments] != list(range(len(manifest.segments))) or not manifest.segments:
        raise ManifestError("the manifest's segments must be numbered 0..K-1")
    return manifest
