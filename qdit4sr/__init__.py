"""qdit4sr: post-training quantization and deployment export for DiT4SR super-resolution transformers."""

__version__ = "0.1.0"
