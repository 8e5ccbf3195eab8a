"""The exported-folder format: `manifest.json` and the files it names, the graph I/O names and axes, and
the graph flavours. Runtimes read it; the exporter writes it."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    **dict.fromkeys(("Manifest", "ManifestError", "FileRef", "TensorSpec", "SegmentEntry", "MANIFEST_FILE",
                     "PLAN_FILE", "PROMPT_FILE", "WEIGHTS_FILE", "graph_file_name", "engine_file_name",
                     "load_codec_spec", "vae_graphs", "codec_files", "VAE_ENCODER_FILE", "VAE_DECODER_FILE"), ".manifest"),
    **dict.fromkeys(("BATCH_AXIS", "INPUT_NAMES", "OUTPUT_NAME", "VAE_IMAGE", "VAE_LATENT", "io_spec"), ".graph_io"),
    **dict.fromkeys(("Flavour", "ENGINE_FLAVOUR", "DEFAULT_EXPORT_FLAVOURS"), ".flavour"),
})
