"""Quantization core: Hadamard rotation, weight quantizer, H-SVD, VaSMP, activation statistics, VaTMP, bit plan."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    **dict.fromkeys(("quantize_", "quantized_layers", "save_quantized", "load_quantized_"), ".api"),
    **dict.fromkeys(("QDiT4SRConfig", "QuantizationSettings", "BitPlan", "LayerPlan", "SoftmaxPlan",
                     "METHOD_PRESETS", "default_rank", "step_to_segment"), ".plan"),
    **dict.fromkeys(("CalibrationConfig", "ActivationStats", "collect_activation_stats"), ".stats"),
    **dict.fromkeys(("example_inputs", "used_linears", "quantizable_linears"), ".layers"),
    **dict.fromkeys(("QuantLinear", "segment_scope"), ".qlinear"),
})
