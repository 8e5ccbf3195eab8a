"""The TensorRT backend compiles against the TensorRT 11 headers and the CUDA runtime headers.

Nothing here can link or run TensorRT, so this keeps the backend from rotting unnoticed: CMake's
QDIT4SR_TENSORRT_COMPILE_ONLY builds serving/cpp/src/trt_backend.cpp to an object file (-Werror on the
project's code). The CUDA headers come from the pip wheels nvidia-cuda-runtime and nvidia-cuda-crt
(the `cpp` extra); the cu12 runtime wheel alone lacks crt/host_defines.h, which cuda_runtime_api.h needs.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .cpp_build import cmake_build, third_party


def cuda_runtime_include() -> Path | None:
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for sub in ("cu13/include", "cuda_runtime/include"):
            include = Path(base) / sub
            if (include / "cuda_runtime_api.h").is_file() and (include / "crt" / "host_defines.h").is_file():
                return include
    return None


def test_tensorrt_backend_compiles(tmp_path):
    trt = third_party() / "tensorrt" / "include"
    if not (trt / "NvInferRuntime.h").is_file():
        pytest.skip(f"no TensorRT headers at {trt} (the shared third-party folder beside the repository)")
    cuda = cuda_runtime_include()
    if cuda is None:
        pytest.skip("no CUDA runtime headers: pip install -e '.[cpp]' (nvidia-cuda-runtime, nvidia-cuda-crt)")
    cmake_build(tmp_path, "-DQDIT4SR_TENSORRT_COMPILE_ONLY=ON", f"-DTensorRT_INCLUDE_DIR={trt}",
                f"-DCUDA_RUNTIME_INCLUDE_DIR={cuda}", targets=("qdit4sr_trt_backend_objects",))
    assert list(tmp_path.rglob("trt_backend.cpp.o")), "no object file was produced"
