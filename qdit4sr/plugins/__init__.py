"""Triton kernels of the side branches, their PTX, the TensorRT plugin registration and the op contract
(`contract.py`) the exporter's plugin nodes follow."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    **dict.fromkeys(("PLUGIN_OPS", "check_plugin_node", "make_plugin_node"), ".contract"),
    "register_plugins": ".trt_plugins",
})
