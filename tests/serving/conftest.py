"""The C++ runtime (serving/cpp) built once per session, and the tiny default's W4A4 export it serves.

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
import torch

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


@pytest.fixture(scope="session")
def cpp_tools(tmp_path_factory) -> CppTools:
    build = tmp_path_factory.mktemp("cpp_build")
    cmake_build(build, targets=("qdit4sr-serve", "qdit4sr-ops"))
    return CppTools(build / "qdit4sr-serve", build / "qdit4sr-ops")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """The embedded tiny model at W4A4 (Q-DiT4SR), portable graphs, 2 timestep segments over its 4 steps.

    Made with the export stages the CLI runs (2 calibration crops, no report) to stay fast.
    """
    from qdit4sr.calibration.plan import QuantizationSettings
    from qdit4sr.exporter.manifest_writer import transformer_hash
    from qdit4sr.exporter.settings import CalibrationSettings, ExportConfig, ExportSettings
    from qdit4sr.exporter.stages import (
        StageLog,
        calibrate,
        export,
        load_pipeline,
        quantize,
    )

    out = tmp_path_factory.mktemp("tiny_w4a4") / "engines"
    out.mkdir()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = ExportSettings(quantization=QuantizationSettings("w4a4", segments=2),
                                  calibration=CalibrationSettings(count=2),
                                  export=ExportConfig(flavours=("portable",)))
        pipe = load_pipeline(settings)
        settings = settings.for_width(pipe.transformer.inner_dim)
        model_hash = transformer_hash(pipe.transformer)
        log = StageLog()
        stats = calibrate(pipe, settings, out, log)
        plan = quantize(pipe, stats, settings, out, log)
        export(pipe, plan, settings, out, model_hash, log)
    finally:
        torch.set_num_threads(before)
    return out
