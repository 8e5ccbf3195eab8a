"""qdit4sr: post-training quantization and deployment export for DiT4SR super-resolution transformers.

The public API is importable from here; each name is imported from its module on first use, so
`import qdit4sr` stays cheap.
"""
from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "DiT4SRTransformer2DModel": ".models.transformer",
    "load_transformer": ".models.loading",
    "quantize_": ".calibration.api",
    "QDiT4SRConfig": ".calibration.plan",
    "BitPlan": ".calibration.plan",
    "export_segments": ".exporter.onnx_export",
    "build_engines": ".engines.build",
    "load_exported_pipeline": ".engines.runtime",
    "Flavour": ".artifacts.flavour",
    "Manifest": ".artifacts.manifest",
})
