"""Building the C++ runtime (serving/cpp) for the tests and benches.

Build dependencies that no registry ships (the ONNX Runtime C++ headers, the TensorRT headers) live
in the shared third-party folder beside the repository, `<repo>/../shared/third_party` (or the folder
named by QDIT4SR_THIRD_PARTY); the tests skip with the reason when it, cmake or a C++ compiler is
missing. libpng and nlohmann-json come from the system (`.ci/run` installs them).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "serving" / "cpp"


def third_party() -> Path:
    return Path(os.environ.get("QDIT4SR_THIRD_PARTY", REPO.parent / "shared" / "third_party"))


def ort_include() -> Path:
    return third_party() / "onnxruntime" / "include"


def ort_library() -> Path | None:
    """The pip onnxruntime wheel's shared library (the wheel has no headers, hence third_party)."""
    import onnxruntime

    found = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
    return Path(found[0]) if found else None


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs)


def cmake_build(build_dir: Path, *options: str, targets: tuple[str, ...] = ()) -> None:
    """Configure serving/cpp into build_dir and build `targets`; fails the test with cmake's output."""
    if shutil.which("cmake") is None or cxx_compiler() is None:
        pytest.skip("cmake or a C++ compiler is not installed")
    if not (ort_include() / "onnxruntime_cxx_api.h").is_file():
        pytest.skip(f"no ONNX Runtime C++ headers at {ort_include()} (the shared third-party folder beside the "
                    f"repository, or QDIT4SR_THIRD_PARTY)")
    library = ort_library()
    if library is None:
        pytest.skip("the onnxruntime wheel has no libonnxruntime.so")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = run(["cmake", "-S", SOURCE, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CXX_COMPILER={cxx_compiler()}", f"-DONNXRUNTIME_INCLUDE_DIR={ort_include()}",
                     f"-DONNXRUNTIME_LIBRARY={library}", *options])
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = run(["cmake", "--build", build_dir, "-j", "2", *[a for t in targets for a in ("--target", t)]])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-3000:]


@dataclass(frozen=True)
class CppTools:
    serve: Path
    ops: Path
