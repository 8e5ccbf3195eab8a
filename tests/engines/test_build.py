"""Engine build and TensorRT runtime: everything around the TensorRT calls, without TensorRT.

A tiny exported folder (manifest, dummy plan, one-node trt graphs, optional engine files) stands in for
a real export; the builder's TensorRT calls run against a recording stand-in of the `tensorrt` module,
so the orchestration (flags, profile, shared timing cache, atomic writes, manifest update) is tested
here; the real build and run are marked `tensorrt` / `cuda` and skip without them.
"""
import importlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qdit4sr.artifacts.manifest import Manifest, ManifestError, graph_file_name
from qdit4sr.engines import build as B
from tests.helpers.export_folder import make_export_folder

@pytest.fixture
def export_folder(tmp_path) -> Path:
    return make_export_folder(tmp_path / "export")


# --------------------------------------------------------------------------- configuration


def test_build_config_defaults_and_validation(tmp_path):
    c = B.EngineBuildConfig()
    assert (c.batch_min, c.batch_opt, c.batch_max) == (1, 2, 32) and c.workspace_bytes == 4 << 30
    assert c.timing_cache(tmp_path) == tmp_path / "timing.cache"
    assert B.EngineBuildConfig(timing_cache_path="/x/t.cache").timing_cache(tmp_path) == Path("/x/t.cache")
    for bad in (dict(batch_min=3, batch_opt=2), dict(batch_opt=40), dict(workspace_bytes=0),
                dict(builder_optimization_level=6), dict(tile_latent=0), dict(batch_max=True)):
        with pytest.raises(ValueError):
            B.EngineBuildConfig(**bad)
    assert json.loads(B.config_summary(c))["batch_max"] == 32


def test_engine_file_name_sits_beside_the_graphs():
    assert B.engine_file_name(0) == "segment_00.plan"
    assert graph_file_name(3, "trt").startswith(B.engine_file_name(3).removesuffix(".plan"))


# --------------------------------------------------------------------------- network inputs and profile


EXPECTED_INPUTS = [("hidden_states", ("batch", 12, 8, 8)), ("controlnet_image", ("batch", 12, 8, 8)),
                   ("encoder_hidden_states", ("batch", 3, 32)), ("pooled_projections", ("batch", 16)),
                   ("timestep", ("batch",))]


def test_network_inputs_from_a_manifest_folder(export_folder):
    by_folder = B.network_inputs(export_folder)
    assert [(s.name, s.shape) for s in by_folder] == EXPECTED_INPUTS
    assert all(s.dtype == "float32" for s in by_folder)
    assert B.network_inputs(Manifest.load(export_folder)) == by_folder
    assert B.network_inputs(dict(EXPECTED_INPUTS)) == by_folder
    assert B.network_inputs([{"name": n, "shape": list(s)} for n, s in EXPECTED_INPUTS]) == by_folder


def test_network_inputs_checks_config_sizes(export_folder):
    assert B.network_inputs(export_folder, B.EngineBuildConfig(tile_latent=8, text_tokens=3))
    with pytest.raises(ValueError, match="tile_latent=16"):
        B.network_inputs(export_folder, B.EngineBuildConfig(tile_latent=16))
    with pytest.raises(ValueError, match="text_tokens=77"):
        B.network_inputs(export_folder, B.EngineBuildConfig(text_tokens=77))


@pytest.mark.parametrize("shapes,match", [
    ({"x": [4, 8]}, "first axis"),
    ({"x": [4, "batch"]}, "first axis"),
    ({"x": ["batch", "batch"]}, "first axis"),
    ({"x": ["batch", "h"]}, "positive ints"),
    ({"x": ["batch", 0]}, "positive ints"),
    ({}, "no inputs"),
])
def test_network_inputs_rejects_other_dynamic_axes(shapes, match):
    with pytest.raises(ValueError, match=match):
        B.network_inputs(shapes)


def test_optimization_profile_shapes(export_folder):
    config = B.EngineBuildConfig(batch_min=1, batch_opt=2, batch_max=8)
    shapes = B.optimization_profile_shapes(export_folder, config)
    assert list(shapes) == [n for n, _ in EXPECTED_INPUTS]
    assert shapes["hidden_states"] == B.ProfileShapes((1, 12, 8, 8), (2, 12, 8, 8), (8, 12, 8, 8))
    assert shapes["encoder_hidden_states"] == B.ProfileShapes((1, 3, 32), (2, 3, 32), (8, 3, 32))
    assert shapes["timestep"] == B.ProfileShapes((1,), (2,), (8,))
    assert B.optimization_profile_shapes(B.network_inputs(export_folder), config) == shapes


# --------------------------------------------------------------------------- availability


def test_tensorrt_status_reports_why_not_here():
    available, reason = B.tensorrt_status()
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        assert not available
        assert "tensorrt Python package is not importable" in reason and "No module named 'tensorrt'" in reason
    else:  # pragma: no cover - machines with TensorRT
        torch = pytest.importorskip("torch")
        assert available == torch.cuda.is_available() or "triton" in reason


def _importer(modules: dict):
    def import_module(name):
        if modules.get(name) is None:
            raise ImportError(f"No module named {name!r}")
        return modules[name]
    return import_module


@pytest.mark.parametrize("modules,cuda,ok,fragments", [
    (dict(tensorrt=None, triton=1), None, False, ["tensorrt Python package is not importable"]),
    (dict(tensorrt=SimpleNamespace(__version__="10.3.0"), **{"tensorrt.plugin": 1}, triton=1), None, False,
     ["tensorrt 10.3.0 is too old", ">= 10.9"]),
    (dict(tensorrt=SimpleNamespace(__version__="10.13.0.35"), triton=1), None, False,
     ["tensorrt.plugin is not importable"]),
    (dict(tensorrt=SimpleNamespace(__version__="11.2.0"), **{"tensorrt.plugin": 1}, triton=None), None, False,
     ["triton is not importable"]),
    (dict(tensorrt=SimpleNamespace(__version__="11.2.0"), **{"tensorrt.plugin": 1}, triton=1), "no CUDA device",
     False, ["no CUDA device"]),
    (dict(tensorrt=None, triton=None), "no CUDA device", False, ["tensorrt Python", "triton", "no CUDA device"]),
    (dict(tensorrt=SimpleNamespace(__version__="10.9.0"), **{"tensorrt.plugin": 1}, triton=1), None, True,
     ["tensorrt 10.9.0"]),
])
def test_tensorrt_status_names_every_missing_piece(modules, cuda, ok, fragments):
    available, reason = B.tensorrt_status(import_module=_importer(modules), cuda_problem=lambda: cuda)
    assert available is ok
    for fragment in fragments:
        assert fragment in reason


def test_build_engines_raises_with_the_status_reason(export_folder):
    available, reason = B.tensorrt_status()
    if available:  # pragma: no cover
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(B.TensorRTUnavailable) as info:
        B.build_engines(export_folder)
    assert reason in str(info.value) and "building TensorRT engines is not possible here" in str(info.value)
    assert not list(export_folder.glob("*.plan"))


# --------------------------------------------------------------------------- manifest update


def test_record_engines_updates_the_manifest(export_folder):
    plan = export_folder / B.engine_file_name(1)
    plan.write_bytes(b"serialized engine")
    manifest = B.record_engines(export_folder, {1: plan})
    assert manifest.segments[0].engine is None
    assert manifest.segments[1].engine.path == "segment_01.plan"
    reloaded = Manifest.load(export_folder)  # hashes verified
    assert reloaded.segments[1].engine == manifest.segments[1].engine
    plan.write_bytes(b"changed engine!!!")
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.load(export_folder)
    with pytest.raises(ValueError, match="segment 5"):
        B.record_engines(export_folder, {5: plan})


# --------------------------------------------------------------------------- build orchestration (stand-in TensorRT)


class _Rec:
    """Records every call made on it and on the objects it hands out."""

    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attr}", args, kwargs))
            return _RESULTS.get(attr, lambda log: _Rec(log, attr))(self._log)
        return call

    def __setattr__(self, key, value):
        if key.startswith("_"):
            object.__setattr__(self, key, value)
        else:
            self._log.append((f"{self._name}.{key}=", (value,), {}))


class _Cache(_Rec):
    def serialize(self):
        self._log.append(("cache.serialize", (), {}))
        return b"timing cache bytes"


_RESULTS = {
    "build_serialized_network": lambda log: b"ENGINE",
    "parse_from_file": lambda log: True,
    "create_timing_cache": lambda log: _Cache(log, "cache"),
}


def _fake_trt(log):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.0.0"
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=1)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Logger = type("Logger", (), {"WARNING": "W", "VERBOSE": "V", "__init__": lambda self, level: None})
    trt.Builder = lambda logger: _Rec(log, "builder")
    trt.OnnxParser = lambda network, logger: _Rec(log, "parser")
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(log))
    monkeypatch.setattr(B, "require_tensorrt", lambda what="": None)
    from qdit4sr.plugins import trt_plugins

    monkeypatch.setattr(trt_plugins, "register_plugins", lambda: log.append(("register_plugins", (), {})))
    return log


def test_build_engines_orchestration(export_folder, fake_trt):
    (export_folder / "timing.cache").write_bytes(b"old cache")
    config = B.EngineBuildConfig(batch_max=4, workspace_bytes=1 << 30, builder_optimization_level=5)
    paths = B.build_engines(export_folder, config)
    assert paths == [export_folder / "segment_00.plan", export_folder / "segment_01.plan"]
    assert all(p.read_bytes() == b"ENGINE" for p in paths)
    calls = [c[0] for c in fake_trt]
    assert calls[0] == "register_plugins"
    # strongly typed (bit 0) + prefer AOT plugins (bit 1)
    assert [c[1] for c in fake_trt if c[0] == "builder.create_network"] == [(3,), (3,)]
    parsed = [Path(c[1][0]).name for c in fake_trt if c[0] == "parser.parse_from_file"]
    assert parsed == ["segment_00.trt.onnx", "segment_01.trt.onnx"]
    assert ("create_builder_config.set_memory_pool_limit", ("WORKSPACE", 1 << 30), {}) in fake_trt
    assert ("create_builder_config.builder_optimization_level=", (5,), {}) in fake_trt
    shapes = [c[1] for c in fake_trt if c[0] == "create_optimization_profile.set_shape"]
    assert len(shapes) == 10 and shapes[0] == ("hidden_states", (1, 12, 8, 8), (2, 12, 8, 8), (4, 12, 8, 8))
    # one timing cache, loaded from disk once, used by both builds, saved once
    assert [c[1] for c in fake_trt if c[0].endswith("create_timing_cache")] == [(b"old cache",)]
    uses = [c for c in fake_trt if c[0].endswith("set_timing_cache")]
    assert len(uses) == 2 and uses[0][1][0] is uses[1][1][0] and uses[0][2] == {"ignore_mismatch": False}
    assert calls.count("cache.serialize") == 1
    assert (export_folder / "timing.cache").read_bytes() == b"timing cache bytes"
    manifest = Manifest.load(export_folder)
    assert [s.engine.path for s in manifest.segments] == ["segment_00.plan", "segment_01.plan"]


def test_build_engines_reports_builder_failure(export_folder, fake_trt, monkeypatch):
    monkeypatch.setitem(_RESULTS, "build_serialized_network", lambda log: None)
    with pytest.raises(RuntimeError, match="failed to build the engine of segment 0"):
        B.build_engines(export_folder)
    assert not list(export_folder.glob("*.plan"))
    assert Manifest.load(export_folder).segments[0].engine is None


def test_parse_failure_lists_the_parser_errors(export_folder):
    trt = SimpleNamespace(OnnxParser=lambda network, logger: SimpleNamespace(
        parse_from_file=lambda path: False, num_errors=2, get_error=lambda i: f"error {i}"))
    with pytest.raises(RuntimeError, match="parser rejected segment 1 \\(segment_01.trt.onnx\\):\n  error 0\n  error 1"):
        B._trt_parse_onnx(trt, None, None, export_folder / "segment_01.trt.onnx", 1)


def test_build_engines_needs_trt_graphs(tmp_path, fake_trt):
    folder = make_export_folder(tmp_path / "portable", flavours=("portable",))
    with pytest.raises(ValueError, match="no 'trt' graph"):
        B.build_engines(folder)


# --------------------------------------------------------------------------- TensorRT runtime backend


def test_backend_registers_with_the_runtime():
    from qdit4sr.engines import runtime, trt_runtime

    assert runtime.get_backend("trt") is trt_runtime.TensorRTBackend
    registered = {}
    trt_runtime.register_tensorrt_backend(lambda name, factory: registered.update({name: factory}))
    assert registered == {"trt": trt_runtime.TensorRTBackend}


def test_backend_unavailable_here(export_folder):
    from qdit4sr.engines import trt_runtime

    if B.tensorrt_status()[0]:  # pragma: no cover
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(B.TensorRTUnavailable, match="running TensorRT engines is not possible here"):
        trt_runtime.TensorRTBackend(export_folder)
    from qdit4sr.engines.runtime import SegmentedRunner

    with pytest.raises(B.TensorRTUnavailable):
        SegmentedRunner(export_folder, flavour="trt")


def _feeds(batch=2):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((batch, *s[1:])).astype(np.float32) for n, s in EXPECTED_INPUTS}


def test_check_feeds(export_folder):
    from qdit4sr.engines.trt_runtime import check_feeds

    inputs = B.network_inputs(export_folder)
    assert check_feeds(inputs, _feeds(3)) == 3
    feeds = _feeds()
    feeds["timestep"] = feeds["timestep"][:1]
    with pytest.raises(ValueError, match="batch 1"):
        check_feeds(inputs, feeds)
    feeds = _feeds()
    feeds["hidden_states"] = feeds["hidden_states"][..., :4]
    with pytest.raises(ValueError, match=r"hidden_states has shape \[2, 12, 8, 4\]"):
        check_feeds(inputs, feeds)
    with pytest.raises(ValueError, match="missing \\['timestep'\\]"):
        check_feeds(inputs, {k: v for k, v in _feeds().items() if k != "timestep"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        check_feeds(inputs, {**_feeds(), "extra": np.zeros(2)})
    with pytest.raises(ValueError, match="empty"):
        check_feeds(inputs, _feeds(0))


def test_check_engine_io(export_folder):
    from qdit4sr.engines.trt_runtime import check_engine_io

    manifest = Manifest.load(export_folder)
    inputs = B.network_inputs(manifest)
    outputs = [B.InputSpec(t.name, tuple(t.shape)) for t in manifest.outputs]
    io = {n: ("INPUT", tuple(-1 if d == "batch" else d for d in s)) for n, s in EXPECTED_INPUTS}
    io["velocity"] = ("OUTPUT", (-1, 12, 8, 8))
    assert check_engine_io(0, inputs, outputs, io) == []
    assert "differ" in check_engine_io(1, inputs, outputs, {**io, "velocity": ("INPUT", (-1, 12, 8, 8))})[0]
    problems = check_engine_io(0, inputs, outputs, {**io, "timestep": ("INPUT", (2,))})
    assert problems == ["segment 0: timestep has engine shape [2], the manifest says ['batch']"]
    assert check_engine_io(0, inputs, outputs, {**io, "timestep": ("INPUT", (-1,), "FLOAT")}) == []
    problems = check_engine_io(0, inputs, outputs, {**io, "velocity": ("OUTPUT", (-1, 12, 8, 8), "HALF")})
    assert problems == ["segment 0: velocity is HALF in the engine, float32 in the manifest"]


def test_torch_dtype_for():
    torch = pytest.importorskip("torch")
    from qdit4sr.engines.trt_runtime import torch_dtype_for

    assert torch_dtype_for("FLOAT") is torch.float32
    assert torch_dtype_for(SimpleNamespace(name="HALF")) is torch.float16
    assert torch_dtype_for("DataType.INT64") is torch.int64
    with pytest.raises(ValueError, match="FP4"):
        torch_dtype_for("FP4")


# --------------------------------------------------------------------------- real TensorRT (skip here)


@pytest.mark.tensorrt
@pytest.mark.cuda
@pytest.mark.slow
def test_build_and_run_micro_export_against_onnxruntime(tmp_path):
    """Export the micro model (trt + portable), build the engines, and compare with onnxruntime."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.helpers.micro_export import export_micro, quantized_micro

    folder = tmp_path / "export"
    export_micro(quantized_micro("qdit4sr", "w4a4"), folder, flavour=("portable", "trt"))
    paths = B.build_engines(folder, B.EngineBuildConfig(batch_max=4, workspace_bytes=1 << 30))
    assert [p.name for p in paths] == [B.engine_file_name(k) for k in range(len(paths))]
    from qdit4sr.engines.runtime import SegmentedRunner

    trt_runner = SegmentedRunner(folder, flavour="trt")
    ort_runner = SegmentedRunner(folder, flavour="portable")
    feeds = {s.name: np.random.default_rng(0).standard_normal(s.concrete(2)).astype(np.float32)
             for s in B.network_inputs(folder)}
    for step in range(trt_runner.num_steps):
        a = trt_runner.backend.run(trt_runner.segment_of_step(step), feeds)
        b = ort_runner.backend.run(ort_runner.segment_of_step(step), feeds)
        assert np.abs(a - b).max() <= 2e-2 * (1 + np.abs(b).max())
