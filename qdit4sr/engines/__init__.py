"""TensorRT engine build, the segmented runtime (onnxruntime and TensorRT backends), trtexec profiling."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    **dict.fromkeys(("build_engines", "EngineBuildConfig", "TensorRTUnavailable", "tensorrt_status"), ".build"),
    **dict.fromkeys(("SegmentedRunner", "load_exported_pipeline", "register_backend", "get_backend"), ".runtime"),
    **dict.fromkeys(("plan_profile", "run_plan"), ".profile"),
})
