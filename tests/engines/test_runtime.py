"""The segmented onnxruntime runner: the whole denoising loop on the exported graphs reproduces the
torch quantized pipeline."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qdit4sr.calibration.cpu_weights import cpu_reference_
from qdit4sr.calibration.qlinear import segment_scope
from qdit4sr.engines import runtime
from qdit4sr.engines.runtime import OrtTransformer, SegmentedRunner, get_backend, load_exported_pipeline
from qdit4sr.models.step_context import step_scope
from tests.helpers.micro import MICRO_CONFIG, micro_inputs
from tests.helpers.micro_export import PIPE, TILE, TOKENS, export_micro, quantized_micro, single_thread


# Median error per call relative to the output scale; float32 reordering gives ~1e-7.
BULK_RTOL = 2e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """W4A4 H-SVD with two timestep segments, exported (portable and cpu) with its manifest."""
    q = quantized_micro("qdit4sr", "w4a4", rank=8, num_segments=2, seed=1)
    folder = tmp_path_factory.mktemp("runtime") / "export"
    export_micro(q, folder, flavour=("portable", "cpu"))
    return q, folder


@pytest.fixture(scope="module")
def cpu_pipeline(exported):
    """The torch pipeline of the cpu graphs: the same model with its residues in the cpu layout."""
    q, _ = exported
    pipe = copy.deepcopy(q.pipeline)
    cpu_reference_(pipe.transformer)
    return pipe


def _image(side: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("flavour", ["portable", "cpu"])
def test_exported_pipeline_reproduces_the_torch_pipeline(exported, cpu_pipeline, flavour):
    """8x8 LR -> 32x32 output: a 16x16 latent in 3x3 overlapping tiles of 8, 4 steps over 2 segments.

    The graphs agree with the torch model of their flavour to ~1e-6 relative per call (the cpu graphs:
    fused integer matmuls, whose integer sums are exact); after the sampler and the uint8 rounding that
    leaves identical pixels, except where a value lands on a rounding boundary (of the uint8
    conversion, or of an activation Q/DQ tie): such a pixel may differ by 1.
    """
    q, folder = exported
    assert len(q.plan.segments) == 2
    pipe = load_exported_pipeline(folder, flavour=flavour, intra_op_num_threads=1)
    assert isinstance(pipe.transformer, OrtTransformer) and pipe.config == PIPE
    assert pipe.transformer.runner.backend.flavour == flavour
    torch_pipe = q.pipeline if flavour == "portable" else cpu_pipeline
    image = _image(8)
    ref = torch_pipe.upscale(image, seed=3)
    got = pipe.upscale(image, seed=3)
    assert got.shape == ref.shape == (32, 32, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    # Sanity: the quantized model's output is far from a trivial one (the comparison can fail).
    assert np.abs(ref.astype(int) - torch_pipe.upscale(image, seed=4).astype(int)).max() > 10


def test_cpu_flavour_is_the_default_and_stays_close_to_the_portable_model(exported, cpu_pipeline):
    """With no flavour named the runner takes the cpu graphs; their image differs from the portable
    model's only by the re-expressed weights (a few grey levels at most on this micro model)."""
    q, folder = exported
    assert SegmentedRunner(folder, check_hashes=False, intra_op_num_threads=1).backend.flavour == "cpu"
    image = _image(8)
    diff = np.abs(cpu_pipeline.upscale(image, seed=3).astype(int) - q.pipeline.upscale(image, seed=3).astype(int))
    assert 0 < diff.max() <= 8, diff.max()


def test_default_flavour_order(monkeypatch):
    class Seg:
        def __init__(self, engine):
            self.engine = engine

    class Folder:
        def __init__(self, flavours, engines=False):
            self.flavours, self.segments = flavours, [Seg("e" if engines else None)]

    assert runtime.default_flavour(Folder(["portable", "trt", "cpu"])) == "cpu"
    assert runtime.default_flavour(Folder(["portable", "trt"], engines=True)) == "portable"  # no TensorRT here
    with pytest.raises(ValueError, match="export the cpu or portable flavour"):
        runtime.default_flavour(Folder(["trt"]))
    from qdit4sr.engines import build

    monkeypatch.setattr(build, "tensorrt_status", lambda: (True, ""))
    assert runtime.default_flavour(Folder(["portable", "trt", "cpu"], engines=True)) == "trt"


def test_runner_picks_the_segment_of_each_step(exported):
    q, folder = exported
    runner = SegmentedRunner(folder, flavour="portable", intra_op_num_threads=1)
    assert [runner.segment_of_step(i) for i in range(runner.num_steps)] == q.plan.segment_of_step()
    inputs = micro_inputs(MICRO_CONFIG, batch=2, size=TILE, tokens=TOKENS, seed=5)
    for step in range(runner.num_steps):
        with torch.no_grad(), step_scope(step):
            ref = q.model(*inputs).numpy()
        err = np.abs(runner.run(step, *inputs) - ref)
        # Bulk agreement to float32 rounding; a rare activation Q/DQ tie that rounds the other way in one
        # of the two moves one activation by one step (see tests/exporter/test_onnx_export.py): bounded.
        assert np.median(err) <= BULK_RTOL * np.abs(ref).max() and err.max() <= 1e-2 * np.abs(ref).max()
    with torch.no_grad(), segment_scope(1):
        other = q.model(*inputs).numpy()
    # The other segment's settings are far outside that tolerance: the segment choice is really tested.
    assert np.median(np.abs(runner.run(0, *inputs) - other)) > 50 * BULK_RTOL * np.abs(other).max()
    with pytest.raises(IndexError, match="outside the 4 exported steps"):
        runner.run(4, *inputs)
    wrong = list(inputs)
    wrong[0] = torch.zeros(2, MICRO_CONFIG["in_channels"], TILE + 2, TILE + 2)
    with pytest.raises(ValueError, match="hidden_states has shape"):
        runner.run(0, *wrong)


def test_transformer_adapter_needs_the_step_when_segmented(exported):
    _, folder = exported
    transformer = OrtTransformer(SegmentedRunner(folder, flavour="portable", check_hashes=False,
                                                 intra_op_num_threads=1))
    assert transformer.eval() is transformer and transformer.config.patch_size == MICRO_CONFIG["patch_size"]
    with pytest.raises(RuntimeError, match="several timestep segments"):
        transformer(*micro_inputs(MICRO_CONFIG, batch=1, size=TILE, tokens=TOKENS))


def test_backend_registry(exported, monkeypatch):
    _, folder = exported
    seen = []

    class Recorder:
        def __init__(self, manifest, folder, scale=1.0):
            self.shape = [2, manifest.transformer["out_channels"], manifest.tile_latent, manifest.tile_latent]
            self.scale = scale

        def run(self, segment_index, feeds):
            seen.append((segment_index, sorted(feeds)))
            return np.full(self.shape, self.scale, dtype=np.float32)

    monkeypatch.setitem(runtime._BACKENDS, "recorder", Recorder)
    runner = SegmentedRunner(folder, flavour="recorder", check_hashes=False, scale=2.0)
    out = runner.run(3, *micro_inputs(MICRO_CONFIG, batch=2, size=TILE, tokens=TOKENS))
    assert out[0, 0, 0, 0] == 2.0
    assert seen == [(1, sorted(t.name for t in runner.manifest.inputs))]
    with pytest.raises(ValueError, match="no runtime backend for flavour 'nope'"):
        get_backend("nope")
    with pytest.raises(ValueError, match="no 'trt' graphs"):
        runtime.OrtBackend(runner.manifest, folder, flavour="trt")


def test_runner_takes_a_validated_manifest_and_a_ready_backend(exported):
    """How a serving model runs the sampler with segments that live elsewhere: nothing is loaded from
    the folder, and each call goes to the given backend with the segment of its step."""
    from qdit4sr.artifacts.manifest import Manifest

    _, folder = exported
    manifest = Manifest.load(folder)
    calls = []

    class Recording:
        def run(self, segment_index, feeds):
            calls.append((segment_index, list(feeds), feeds["hidden_states"].dtype))
            return np.zeros_like(feeds["hidden_states"])

    runner = SegmentedRunner(folder / "graphs-live-elsewhere", manifest=manifest, backend=Recording())
    inputs = micro_inputs(MICRO_CONFIG, batch=2, size=TILE, tokens=TOKENS, seed=5)
    assert runner.run(3, *inputs).shape == (2, MICRO_CONFIG["in_channels"], TILE, TILE)
    assert calls == [(manifest.segment_of_step(3), [t.name for t in manifest.inputs], np.float32)]


def _caption(tokens: int = TOKENS, seed: int = 11):
    from qdit4sr.models.pipeline import PromptEmbeddings

    gen = torch.Generator().manual_seed(seed)
    joint, pooled = MICRO_CONFIG["joint_attention_dim"], MICRO_CONFIG["pooled_projection_dim"]
    return PromptEmbeddings(*(torch.randn(shape, generator=gen) for shape in
                              ((1, tokens, joint), (1, pooled), (1, tokens, joint), (1, pooled))))


def test_per_request_prompt_with_cfg_reproduces_the_torch_pipeline(exported):
    """A caption's embeddings (with a negative pair) given per call, guidance 4: the exported runtime runs
    CFG with them exactly as the torch pipeline does (same tolerance as without a prompt), and the result
    is not the one of the manifest's prompt (the per-call prompt is really used)."""
    from dataclasses import replace

    q, folder = exported
    pipe = load_exported_pipeline(folder, flavour="portable", intra_op_num_threads=1)
    torch_pipe = copy.copy(q.pipeline)
    pipe.config = torch_pipe.config = replace(PIPE, guidance_scale=4.0)
    prompt = _caption()
    assert pipe.upscale_work((8, 8, 3), prompt=prompt).cfg and not pipe.upscale_work((8, 8, 3)).cfg
    image = _image(8)
    ref = torch_pipe.upscale(image, seed=3, prompt=prompt)
    got = pipe.upscale(image, seed=3, prompt=prompt)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    # The micro model's text conditioning is weak: other embeddings move pixels by up to ~9 levels here,
    # far beyond the 1-level tolerance above.
    assert np.abs(got.astype(int) - pipe.upscale(image, seed=3).astype(int)).max() > 4


def test_per_request_prompt_must_fit_the_graphs(exported):
    from qdit4sr.models.pipeline import PromptError

    _, folder = exported
    pipe = load_exported_pipeline(folder, flavour="portable", intra_op_num_threads=1)
    with pytest.raises(PromptError, match=rf"exported graphs take {TOKENS} text tokens\): prompt_embeds has shape "
                                          rf"\[1, {TOKENS + 2}, 32\], expected \[1, {TOKENS}, 32\]"):
        pipe.upscale(_image(8), prompt=_caption(tokens=TOKENS + 2))
