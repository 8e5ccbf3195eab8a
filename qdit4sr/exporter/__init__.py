"""ONNX export per timestep segment (and of a VAE codec), graph rewrite, fp16 storage, external data,
TensorRT lint, the manifest writer and the export stages."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    **dict.fromkeys(("export_segments", "SegmentExport"), ".onnx_export"),
    **dict.fromkeys(("build_manifest", "transformer_hash", "codec_spec"), ".manifest_writer"),
    "export_vae": ".vae_export",
    **dict.fromkeys(("lint_model", "format_violations"), ".trt_lint"),
    **dict.fromkeys(("ExportSettings", "ModelSettings", "CalibrationSettings", "ExportConfig"), ".settings"),
})
