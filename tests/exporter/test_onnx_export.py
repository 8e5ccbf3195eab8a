"""ONNX export: the portable graphs compute what the torch fake-quant model computes, the graphs pass the
ONNX checker, polygraphy's lint and the TensorRT lint, weights are really INT4/INT8, and the shared
weights file is written once."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.artifacts.graph_io import INPUT_NAMES
from qdit4sr.calibration.api import quantized_layers
from qdit4sr.calibration.hadamard import apply_hadamard
from qdit4sr.calibration.qlinear import NO_ACT_QUANT, segment_scope
from qdit4sr.calibration.qsoftmax import quantized_softmaxes
from qdit4sr.calibration.quantizer import qmax
from qdit4sr.exporter import graph_checks, onnx_export
from qdit4sr.exporter.external_data import DEFAULT_THRESHOLD_BYTES, WEIGHTS_FILE
from qdit4sr.exporter.onnx_export import export_segments
from qdit4sr.exporter.trt_lint import lint_model
from qdit4sr.plugins import contract
from tests.helpers.micro import MICRO_CONFIG, micro_inputs
from tests.helpers.micro_export import TILE, TOKENS, ort_session, quantized_micro, single_thread

# Float32 ops in another order: ~1e-7 relative per op (one layer: tests/exporter/test_graph_rewrite.py).
MODEL_RTOL = 1e-5
# A Q/DQ rounding tie (x/s within float error of k + 1/2) may round differently in torch and onnxruntime,
# moving that activation by one step; its effect through the later layers stays below this.
MODEL_TIE_RTOL = 1e-2
TIE_MARGIN = 1e-2  # |frac(x/s) - 1/2| below this (in code units) counts as a tie


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


# ----------------------------------------------------------------------------- whole transformer

W4A4_BOOST = ("transformer_blocks.1.ff.net.2", "transformer_blocks.0.attn.to_out.0")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three quantized micro models, each exported once: {case: (quantized, exports, folder)}."""
    cases = {
        # W4A4 H-SVD with VaSMP (two boosted layers get wider weights) and VaTMP segments
        "w4a4_hsvd": (dict(preset="qdit4sr", precision="w4a4", rank=8, num_segments=2, boost=W4A4_BOOST), ("portable", "trt")),
        # the published dit4sr_q variant: to_k_control is computed and unused (dead code in the graph)
        # INT8 weights in groups of 64 (portable only: TensorRT blocks only INT4), the [K/G, G, N] layout
        "w8a8_rtn": (dict(preset="rtn", precision="w8a8", model_config={"variant": "dit4sr_q"}, wide_group_size=64),
                     "portable"),
        # the same model and plan with float32 storage: the fp16 export must halve its float weights
        "w4a4_hsvd_fp32": (dict(preset="qdit4sr", precision="w4a4", rank=8, num_segments=2, boost=W4A4_BOOST,
                                storage_dtype="float32"), "portable"),
        # float32 storage: the branches, scales and FP layers keep every bit
        "w4a6_svd_per_channel": (dict(preset="svdquant", precision="w4a6", rank=8, group_size=None,
                                      storage_dtype="float32"), ("portable", "trt")),
    }
    out = {}
    for name, (kwargs, flavour) in cases.items():
        q = quantized_micro(kwargs.pop("preset"), kwargs.pop("precision"), **kwargs)
        folder = tmp_path_factory.mktemp(name) / "export"
        with single_thread():
            exports = export_segments(q.model, q.plan, folder, TILE, TOKENS, flavour=flavour, progress=False)
        out[name] = (q, exports, folder)
    return out


def test_w4a4_fixture_has_segments_and_mixed_weight_bits(exported):
    q, exports, _ = exported["w4a4_hsvd"]
    assert len(exports) == len(q.plan.segments) >= 2
    bits = q.plan.weight_bits()
    assert bits.min() <= 4 < bits.max()  # INT4 and INT8 containers in the same graph
    assert all(l.rank == 8 and l.block_shape for l in q.plan.layers)


def _graph_with_code_outputs(path: Path) -> Path:
    """A copy of the graph (same folder, so the weights resolve) that also outputs every QuantizeLinear."""
    model = onnx.load(path, load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            model.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.INT8, None))
    probe = path.with_name(path.stem + ".probe.onnx")
    onnx.save(model, probe)
    return probe


def _torch_codes(model, inputs, segment):
    """Reference output plus, per layer, its activation codes and x/s as the torch fake-quant computes them."""
    seen = {}

    def hook(mod, args, name):
        bits, s = mod.act_bits[segment], mod.act_scales[segment]
        if bits < NO_ACT_QUANT:
            r = ((apply_hadamard(args[0]) if mod.hadamard else args[0]) / s).double()
            seen[name] = (torch.clamp(torch.round(r), -qmax(bits), qmax(bits)).numpy(), r.numpy())

    def softmax_hook(mod, args, name):
        r = (args[0] / mod.scales[segment]).double()
        seen[name] = (torch.clamp(torch.round(r), -qmax(mod.bits), qmax(mod.bits)).numpy(), r.numpy())

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, m in quantized_layers(model).items()]
    handles += [m.register_forward_pre_hook(lambda mod, a, n=n: softmax_hook(mod, a, n))
                for n, m in quantized_softmaxes(model).items()]
    try:
        with torch.no_grad(), segment_scope(segment):
            ref = model(*inputs).numpy()
    finally:
        for h in handles:
            h.remove()
    return ref, seen


def _compare_model(q, path: Path, segment: int, batch: int, dead: list[str]) -> dict:
    """Run the graph and the torch model; return the error stats and the activation-code disagreements.

    The first code disagreement (in call order) must sit at a rounding tie. With none, the outputs agree
    to MODEL_RTOL; with some, to MODEL_TIE_RTOL (one step moved on a tie, propagated through the later
    layers, where it can move further codes).
    """
    inputs = micro_inputs(MICRO_CONFIG, batch=batch, size=TILE, tokens=TOKENS, seed=3)
    ref, torch_codes = _torch_codes(q.model, inputs, segment)
    probe = _graph_with_code_outputs(path)
    try:
        session = ort_session(probe)
    finally:
        probe.unlink()
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})))
    codes = {name.split("/")[0]: value for name, value in results.items() if name != "velocity"}
    assert set(codes) == set(torch_codes) - set(dead)
    mismatches, total, first = 0, 0, None
    for layer, (expected, ratio) in torch_codes.items():  # call order
        if layer in dead:  # computed by torch, absent from the graph: it does not reach the output
            continue
        differ = codes[layer] != expected
        total += differ.size
        mismatches += int(differ.sum())
        if differ.any() and first is None:
            # The first disagreement must be a tie; later layers see its effect and may then differ anywhere.
            first = layer
            tie_distance = np.abs(ratio - np.floor(ratio) - 0.5)[differ]
            assert (tie_distance < TIE_MARGIN).all(), f"{layer}: codes differ away from a rounding tie"
    got = results["velocity"]
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    rel = float(np.abs(got - ref).max()) / scale
    assert rel <= (MODEL_RTOL if mismatches == 0 else MODEL_TIE_RTOL), (rel, mismatches)
    return {"rel_err": rel, "code_mismatches": mismatches, "codes": total, "first_mismatch": first}


@pytest.mark.parametrize("case", ["w4a4_hsvd", "w8a8_rtn", "w4a6_svd_per_channel"])
def test_portable_graphs_match_the_fake_quant_model(exported, case):
    q, exports, _ = exported[case]
    for seg in exports:
        for batch in (2, 1):  # dynamic batch
            stats = _compare_model(q, seg.graphs["portable"], seg.index, batch, seg.dead_layers)
            assert stats["codes"] > 0


def test_segments_differ_more_than_the_tolerance(exported):
    """Guards against a test that cannot fail: the two segments' torch outputs are far apart."""
    q, exports, _ = exported["w4a4_hsvd"]
    inputs = micro_inputs(MICRO_CONFIG, batch=2, size=TILE, tokens=TOKENS, seed=3)
    with torch.no_grad():
        outs = []
        for seg in exports:
            with segment_scope(seg.index):
                outs.append(q.model(*inputs).numpy())
    assert np.abs(outs[0] - outs[1]).max() > 100 * MODEL_RTOL * np.abs(outs[0]).max()


@pytest.mark.parametrize("case", ["w4a4_hsvd", "w8a8_rtn"])
def test_softmax_input_is_8_bit_with_the_segment_scale(exported, case):
    q, exports, _ = exported[case]
    scales = {site.name: site.scales for site in q.plan.softmax}
    assert len(scales) == len(quantized_softmaxes(q.model)) > 0
    for seg in exports:
        for path in seg.graphs.values():
            model = onnx.load(path, load_external_data=False)
            producer = {o: n for n in model.graph.node for o in n.output}
            consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                      if t.data_location != TensorProto.EXTERNAL}  # scales are small, so inline
            softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
            assert len(softmaxes) == len(scales)
            for node in softmaxes:
                dq = producer[node.input[0]]
                quant = producer[dq.input[0]]
                site = node.name.split("/")[0]
                assert dq.op_type == "DequantizeLinear" and quant.op_type == "QuantizeLinear"
                assert consts[quant.input[2]].dtype == np.int8
                assert float(consts[dq.input[1]]) == np.float32(scales[site][seg.index])
                clip = producer[quant.input[0]]
                assert clip.op_type == "Clip" and float(consts[clip.input[2]]) == pytest.approx(
                    127 * scales[site][seg.index], rel=1e-6)


def test_int8_weights_are_per_channel_by_default_and_blocked_ones_are_refused_for_trt(exported, tmp_path):
    q, _, _ = exported["w4a4_hsvd"]
    wide = [l for l in quantized_layers(q.model).values() if l.weight_bits > 4]
    assert wide and all(l.group_size is None and l.weight_scales.shape[1] == 1 for l in wide)
    assert all(l.group_size == 64 for l in quantized_layers(q.model).values() if l.weight_bits <= 4)
    q8, _, _ = exported["w8a8_rtn"]
    assert all(l.group_size == 64 for l in quantized_layers(q8.model).values())
    with pytest.raises(ValueError, match="wide_group_size=None"):
        export_segments(q8.model, q8.plan, tmp_path / "out", TILE, TOKENS, flavour="trt", progress=False)
    assert not (tmp_path / "out").exists()


def test_graphs_pass_the_checker_and_the_lints(exported):
    for case, (_, exports, _) in exported.items():
        for seg in exports:
            for flavour, path in seg.graphs.items():
                onnx.checker.check_model(str(path), full_check=True)
                if flavour == "trt":
                    assert lint_model(path) == [], (case, seg.index)
                    model = onnx.load(path, load_external_data=False)
                    ops = {n.op_type for n in model.graph.node if n.domain == contract.DOMAIN}
                    assert "LowRankBranch" in ops and all(n.domain in ("", contract.DOMAIN) for n in model.graph.node)
    report = graph_checks.polygraphy_lint(exported["w4a4_hsvd"][1][0].graphs["portable"])
    assert report.passed, report.errors


def _initializers(path: Path) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}


@pytest.mark.parametrize("case", ["w4a4_hsvd", "w8a8_rtn", "w4a6_svd_per_channel"])
def test_weights_are_really_int4_or_int8(exported, case):
    q, exports, folder = exported[case]
    model = onnx.load(exports[0].graphs["portable"])  # with the external data, to read the codes back
    inits = {t.name: t for t in model.graph.initializer}
    layers = quantized_layers(q.model)
    dead = set(exports[0].dead_layers)
    assert dead == ({n for n in layers if n.endswith("to_k_control")} if case == "w8a8_rtn" else set())
    for lp in q.plan.layers:
        if lp.name in dead:
            assert f"{lp.name}.qweight" not in inits
            continue
        t = inits[f"{lp.name}.qweight"]
        assert t.data_type == (TensorProto.INT4 if lp.weight_bits <= 4 else TensorProto.INT8), lp.name
        # [K, N], or [K/G, G, N] for blocked INT8 in the portable flavour (same bytes)
        assert t.dims[-1] == lp.out_features and np.prod(t.dims) == lp.in_features * lp.out_features
        codes = numpy_helper.to_array(t).astype(np.int8).reshape(lp.in_features, lp.out_features)
        assert np.array_equal(codes, layers[lp.name].qweight.numpy().T), lp.name
        assert np.abs(codes).max() <= qmax(lp.weight_bits)
    if case == "w4a4_hsvd":
        sizes = {t.data_type for n, t in inits.items() if n.endswith(".qweight")}
        assert sizes == {TensorProto.INT4, TensorProto.INT8}


def test_float_weights_are_stored_in_the_plan_precision(exported):
    """fp16 storage: branches, scales, biases and the FP layers are FLOAT16 initializers, each widened by
    a Cast (weight DQs output fp16 then Cast); float32 storage keeps them FLOAT. Bit-exactness of the
    stored values is what the graph-vs-torch comparisons check."""
    for case, expected in (("w4a4_hsvd", TensorProto.FLOAT16), ("w4a6_svd_per_channel", TensorProto.FLOAT)):
        q, exports, _ = exported[case]
        for path in exports[0].graphs.values():
            model = onnx.load(path, load_external_data=False)
            inits = {t.name: t for t in model.graph.initializer}
            layer = q.plan.layers[0].name
            for suffix in ("lowrank_down", "lowrank_up", "bias", "weight_scale"):
                names = [n for n in inits if n.startswith(f"{layer}.{suffix}")]
                assert names and all(inits[n].data_type == expected for n in names), (case, suffix)
            hadamard = [t for n, t in inits.items() if n.startswith("hadamard_")]
            assert hadamard and all(t.data_type == TensorProto.FLOAT for t in hadamard)  # 1/sqrt(m): not exact
            large = {n: t.data_type for n, t in inits.items() if t.data_location == TensorProto.EXTERNAL
                     and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and not n.startswith("hadamard_")}
            assert len(large) > 20 and set(large.values()) == {expected}, case  # FP layers too, e.g. the embedders
            casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits]
            assert bool(casts) == (expected == TensorProto.FLOAT16)
            assert all(inits[n.input[0]].data_type == TensorProto.FLOAT16 for n in casts)
            for node in model.graph.node:  # every weight DQ with an fp16 scale is followed by a Cast
                if node.op_type == "DequantizeLinear" and inits.get(node.input[1]) is not None \
                        and inits[node.input[1]].data_type == TensorProto.FLOAT16:
                    users = [n for n in model.graph.node if node.output[0] in n.input]
                    assert [u.op_type for u in users] == ["Cast"], node.name


def _external_bytes(path: Path) -> dict[str, tuple[int, int, int]]:
    """Per external initializer (name without the .fp16 suffix): (dtype, bytes, offset in the weights file)."""
    out = {}
    for t in onnx.load(path, load_external_data=False).graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name.removesuffix(".fp16")] = (t.data_type, int(info["length"]), int(info["offset"]))
    return out


def test_fp16_storage_halves_the_float_weights(exported):
    half = _external_bytes(exported["w4a4_hsvd"][1][0].graphs["portable"])
    full = _external_bytes(exported["w4a4_hsvd_fp32"][1][0].graphs["portable"])
    assert set(half) <= set(full)
    for name in set(full) - set(half):  # half the bytes fell under the threshold: stored inline
        assert full[name][0] == TensorProto.FLOAT and full[name][1] // 2 < DEFAULT_THRESHOLD_BYTES, name
    floats = [n for n, (dtype, *_) in full.items() if dtype == TensorProto.FLOAT and not n.startswith("hadamard_")]
    assert len(floats) > 20
    for name in floats:
        if name in half:
            assert half[name][:2] == (TensorProto.FLOAT16, full[name][1] // 2), name
    for name, (dtype, length, _) in full.items():  # integer codes and Hadamard factors are unchanged in size
        if name in half and name not in floats:
            assert half[name][:2] == (dtype, length), name
    sizes = [exported[c][1][0].weights.stat().st_size for c in ("w4a4_hsvd", "w4a4_hsvd_fp32")]
    unique_float_bytes = sum({full[n][2]: full[n][1] for n in floats}.values())
    assert sizes[1] - sizes[0] >= 0.45 * unique_float_bytes  # alignment padding aside


def test_shared_weights_file_is_written_once(exported):
    q, exports, folder = exported["w4a4_hsvd"]
    files = sorted(p.name for p in folder.iterdir())
    graphs = [p for seg in exports for p in seg.graphs.values()]
    assert len(graphs) == 4 and files == sorted([WEIGHTS_FILE] + [p.name for p in graphs])
    placements: dict[str, tuple] = {}
    external_bytes = []
    for path in graphs:
        ext = 0
        for name, t in _initializers(path).items():
            if t.data_location != TensorProto.EXTERNAL:
                assert len(t.raw_data) < 1024, name  # only small constants stay inline
                continue
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == WEIGHTS_FILE
            where = (info["offset"], info["length"])
            assert placements.setdefault(name, where) == where, name  # same offsets in every graph
            ext += int(info["length"])
        external_bytes.append(ext)
    weights = (folder / WEIGHTS_FILE).stat().st_size
    # One copy: at most one graph's external bytes (content dedupe can only shrink it) plus alignment.
    assert weights <= max(external_bytes) + 64 * len(placements)
    assert sum(external_bytes) > 3 * weights
    assert exports[0].weights_sha256 == exports[1].weights_sha256
    # The residue codes are 4 bits for most layers: far smaller than the fp32 weights they replace.
    fp32 = sum(4 * l.in_features * l.out_features for l in q.plan.layers)
    codes = sum(int({e.key: e.value for e in t.external_data}["length"])
                for n, t in _initializers(graphs[0]).items() if n.endswith(".qweight"))
    assert codes < fp32 / 5


# ----------------------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def rtn(tmp_path_factory):
    return quantized_micro("rtn", "w8a8")


def test_rejects_plans_that_do_not_match_the_model(rtn, tmp_path):
    plan = rtn.plan
    fewer = dataclasses.replace(plan, layers=plan.layers[1:])
    with pytest.raises(ValueError, match="plan and model disagree"):
        export_segments(rtn.model, fewer, tmp_path / "a", TILE, TOKENS)
    renamed = dataclasses.replace(plan, layers=[dataclasses.replace(plan.layers[0], name="nope")] + plan.layers[1:])
    with pytest.raises(ValueError, match="missing in model: \\['nope'\\]"):
        export_segments(rtn.model, renamed, tmp_path / "b", TILE, TOKENS)
    other_bits = dataclasses.replace(plan, layers=[dataclasses.replace(plan.layers[0], act_bits=[6])] + plan.layers[1:])
    with pytest.raises(ValueError, match="activation bits"):
        export_segments(rtn.model, other_bits, tmp_path / "c", TILE, TOKENS)
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel
    with pytest.raises(ValueError, match="no QuantLinear"):
        export_segments(DiT4SRTransformer2DModel(**MICRO_CONFIG), plan, tmp_path / "d", TILE, TOKENS)
    assert not any(tmp_path.iterdir())  # validation happens before anything is written


def test_rejects_bad_tiles_flavours_and_folders(rtn, tmp_path):
    max_tile = MICRO_CONFIG["pos_embed_max_size"] * MICRO_CONFIG["patch_size"]
    for tile, match in ((7, "multiple of the patch size"), (max_tile + 2, "pos_embed_max_size"), (0, "positive")):
        with pytest.raises(ValueError, match=match):
            export_segments(rtn.model, rtn.plan, tmp_path / "x", tile, TOKENS)
    with pytest.raises(ValueError, match="flavour"):
        export_segments(rtn.model, rtn.plan, tmp_path / "x", TILE, TOKENS, flavour="tensorrt")
    with pytest.raises(ValueError, match="opset"):
        export_segments(rtn.model, rtn.plan, tmp_path / "x", TILE, TOKENS, opset=17)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write|not a folder"):
        export_segments(rtn.model, rtn.plan, blocker / "out", TILE, TOKENS)
    with pytest.raises(ValueError, match="not a folder"):
        export_segments(rtn.model, rtn.plan, blocker, TILE, TOKENS)


def test_failed_export_leaves_nothing_behind(rtn, tmp_path, monkeypatch):
    def broken(path):
        raise ValueError("checker says no")

    monkeypatch.setattr(onnx_export, "check_onnx", broken)
    with pytest.raises(ValueError, match="checker says no"), single_thread():
        export_segments(rtn.model, rtn.plan, tmp_path / "out", TILE, TOKENS, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out nor the staging folder


def test_export_into_an_existing_folder_keeps_other_files(rtn, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.txt").write_text("kept")
    with single_thread():
        exports = export_segments(rtn.model, rtn.plan, folder, TILE, TOKENS, flavour="trt", progress=False)
    assert sorted(os.listdir(folder)) == ["README.txt", "segment_00.trt.onnx", WEIGHTS_FILE]
    assert exports[0].graphs == {"trt": folder / "segment_00.trt.onnx"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
