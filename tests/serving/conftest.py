"""Session fixtures for the serving tests: the tiny default's W4A4 export (portable graphs, two timestep
segments), the C++ runtime built from serving/cpp, the export's Triton model repository and a local
tritonserver serving it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from .cpp_build import CppTools, cmake_build


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


@pytest.fixture(scope="session")
def served_repository(tiny_export, tmp_path_factory):
    """The python form, one onnxruntime and one torch thread per instance (the reference runs the same)."""
    from qdit4sr.serving.triton_repo import RepositorySettings, write_model_repository

    settings = RepositorySettings(segment_form="python", upscale_instances=2, intra_op_threads=1, torch_threads=1)
    return write_model_repository(tiny_export, tmp_path_factory.mktemp("repo") / "models", settings)


@pytest.fixture(scope="session")
def triton_server(served_repository, tmp_path_factory):
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install '.[serve]')")
    from qdit4sr.serving.local_server import LocalTritonServer, TritonUnavailable, find_bundled_tritonserver

    try:
        installation = find_bundled_tritonserver()
    except TritonUnavailable as e:
        pytest.skip(f"no tritonserver: {e}")
    workdir = tmp_path_factory.mktemp("tritonserver")
    server = LocalTritonServer(served_repository.root, workdir, installation=installation, startup_timeout=300,
                               exit_timeout=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir / "backends", ignore_errors=True)


@pytest.fixture(scope="session")
def reference_pipeline(tiny_export):
    """The in-process Python runtime on the same export, with the served models' thread settings."""
    from qdit4sr.engines.runtime import load_exported_pipeline

    return load_exported_pipeline(tiny_export, intra_op_num_threads=1)
