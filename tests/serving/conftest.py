"""Session fixtures for the serving tests: one W4A4 export of the embedded tiny model (portable graphs,
two timestep segments), its Triton model repository, and a local tritonserver serving it."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.micro_export import single_thread

SEED_IMAGE = 3


def export_default_tiny(folder):
    """Quantize the shipped tiny model (full Q-DiT4SR method, W4A4, 2 segments) and export its portable graphs."""
    from qdit4sr.calibration.api import quantize_
    from qdit4sr.calibration.layers import example_inputs, used_linears
    from qdit4sr.calibration.plan import QDiT4SRConfig
    from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats
    from qdit4sr.exporter.manifest_writer import build_manifest, transformer_hash
    from qdit4sr.exporter.onnx_export import export_segments
    from qdit4sr.models.pipeline import load_default_pipeline

    with single_thread(), torch.no_grad():
        pipe = load_default_pipeline()
        model = pipe.transformer
        model_hash = transformer_hash(model)
        stats = collect_activation_stats(pipe, used_linears(model, example_inputs(model)),
                                         CalibrationConfig(num_images=1, lr_crop=8, batch_size=1), progress=False)
        plan = quantize_(model, QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=2, rank=4), stats,
                         progress=False)
        tile, tokens = pipe.config.tile_size, pipe.prompt.prompt_embeds.shape[1]
        exports = export_segments(model, plan, folder, tile, tokens, flavour="portable", progress=False)
    manifest = build_manifest(folder, exports, plan, model_hash=model_hash, pipeline_config=pipe.config,
                              codec=pipe.codec, transformer_config=model.config, tile_latent=tile, text_tokens=tokens,
                              prompt=pipe.prompt)
    manifest.save(folder)
    return manifest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "export"
    folder.mkdir()
    manifest = export_default_tiny(folder)
    assert len(manifest.segments) == 2, "the fixture must exercise switching segment models"
    return folder


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
