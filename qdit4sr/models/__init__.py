"""DiT4SR transformer, configs, checkpoint loading, the full-precision SR pipeline and the embedded tiny default."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "DiT4SRTransformer2DModel": ".transformer",
    **dict.fromkeys(("load_transformer", "save_transformer", "CheckpointError"), ".loading"),
    **dict.fromkeys(("DiT4SRPipeline", "PipelineConfig", "PromptEmbeddings", "load_default_pipeline",
                     "DEFAULT_MODEL_DIR"), ".pipeline"),
    **dict.fromkeys(("PixelUnshuffleCodec", "VAECodec"), ".latents"),
    "OnnxVAECodec": ".onnx_vae",
    **dict.fromkeys(("TINY_CONFIG", "DIT4SR_CONFIG"), ".config"),
})
