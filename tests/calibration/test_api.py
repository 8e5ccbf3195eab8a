import pytest
import torch

from qdit4sr.calibration.api import quantize_, quantized_layers
from qdit4sr.calibration.plan import BitPlan, QDiT4SRConfig
from qdit4sr.calibration.qlinear import segment_scope
from tests.calibration.conftest import fresh_model
from tests.helpers.micro import micro_inputs


def _output_error(calibrated, qconfig, segment=0):
    config, _, stats = calibrated
    ref_model, model = fresh_model(calibrated), fresh_model(calibrated)
    plan = quantize_(model, qconfig, stats, progress=False)
    inputs = micro_inputs(config)
    with torch.no_grad(), segment_scope(segment):
        ref, out = ref_model(*inputs), model(*inputs)
    return float((out - ref).norm() / ref.norm()), plan, model


def test_replaces_every_calibrated_layer_and_meets_budgets(calibrated):
    _, _, stats = calibrated
    err, plan, model = _output_error(calibrated, QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=3))
    assert set(quantized_layers(model)) == set(stats.layers)
    assert plan.mean_weight_bits() == pytest.approx(4.0)        # VaSMP meets the weighted budget exactly
    assert (plan.act_bits_grid().mean(axis=1) <= 4.0 + 1e-9).all()  # VaTMP: per-layer budget over steps
    assert len(plan.segments) <= 3
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()
    assert err < 0.5


def test_high_precision_is_close_to_full_precision(calibrated):
    err, _, _ = _output_error(calibrated, QDiT4SRConfig.preset("rtn", "w8a8"))
    assert err < 0.03, err


def test_weight_only_error_shrinks_with_branches(calibrated):
    errors = {name: _output_error(calibrated, QDiT4SRConfig.preset(name, "w3a16", rank=8))[0]
              for name in ("rtn", "svdquant", "hsvd")}
    assert errors["svdquant"] < errors["rtn"]
    assert errors["hsvd"] < errors["svdquant"]


def test_stats_for_unknown_layers_are_refused(calibrated):
    _, _, stats = calibrated
    from dataclasses import replace

    bad = replace(stats, layers=["transformer_blocks.0.nope"] + stats.layers[1:])
    with pytest.raises(ValueError, match="lacks"):
        quantize_(fresh_model(calibrated), QDiT4SRConfig(), bad, progress=False)


def test_quantized_state_round_trip(calibrated, tmp_path):
    from qdit4sr.calibration.api import load_quantized_, save_quantized

    config, _, stats = calibrated
    model = fresh_model(calibrated)
    plan = quantize_(model, QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=2), stats, progress=False)
    save_quantized(model, tmp_path / "q.safetensors")
    again = fresh_model(calibrated)
    load_quantized_(again, BitPlan.from_json(plan.to_json()), tmp_path / "q.safetensors")
    inputs = micro_inputs(config)
    for k in range(len(plan.segments)):
        with torch.no_grad(), segment_scope(k):
            assert torch.equal(model(*inputs), again(*inputs))


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_storage_precision_of_everything_kept_in_floating_point(calibrated, storage):
    def exact16(t):
        return torch.equal(t.float().half().float(), t.float())

    model = fresh_model(calibrated)
    quantize_(model, QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=2, storage_dtype=storage), calibrated[2],
              progress=False)
    layers = quantized_layers(model)
    floats = [t for m in layers.values() for t in (m.bias, m.up, m.down, m.block_sigma, m.block_u, m.block_v)
              if t is not None] + list(model.parameters())
    scales = [m.weight_scales for m in layers.values()]
    if storage == "float16":
        assert all(exact16(t) for t in floats)
        assert all(s.dtype == torch.float16 for s in scales)
    else:  # untouched: random float32 weights are almost never fp16 values
        assert sum(not exact16(t) for t in floats) > 0.9 * len(floats)
        assert all(s.dtype == torch.float32 for s in scales)


def test_fp16_storage_costs_little_against_float32(calibrated):
    err16, _, _ = _output_error(calibrated, QDiT4SRConfig.preset("rtn", "w8a8"))
    err32, _, _ = _output_error(calibrated, QDiT4SRConfig.preset("rtn", "w8a8", storage_dtype="float32"))
    assert abs(err16 - err32) < 0.05 * err32, (err16, err32)


def test_beyond_paper_presets_stay_in_budget_and_help(calibrated):
    """Budget split: per-layer FP parameters never above the paper's H-SVD; GPTQ lowers the weight-only error."""
    from qdit4sr.calibration.hsvd import svdg_param_count, svdl_param_count

    def fp_params(lp):
        blocks = 0 if lp.block_shape is None else svdl_param_count(lp.out_features, lp.in_features, *lp.block_shape)
        return svdg_param_count(lp.out_features, lp.in_features, lp.rank) + blocks

    errors, plans = {}, {}
    for name in ("hsvd", "hsvd_split", "hsvd_split_gptq"):
        errors[name], plans[name], _ = _output_error(calibrated, QDiT4SRConfig.preset(name, "w3a16", rank=4))
    for paper, split in zip(plans["hsvd"].layers, plans["hsvd_split"].layers):
        assert fp_params(split) <= fp_params(paper), split.name
    assert errors["hsvd_split_gptq"] < errors["hsvd_split"]
    # The full new method runs end to end and records its choices in the plan.
    err, plan, _ = _output_error(calibrated, QDiT4SRConfig.preset("qdit4sr_plus", "w4a4", num_segments=3))
    assert plan.config.error_compensation == "gptq_act" and plan.config.decomposition == "hsvd_split"
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()
    assert err < 0.5


def test_gptq_without_gram_is_refused(calibrated):
    from dataclasses import replace

    _, _, stats = calibrated
    with pytest.raises(ValueError, match="Gram"):
        quantize_(fresh_model(calibrated), QDiT4SRConfig.preset("hsvd_split_gptq", "w4a4"), replace(stats, gram=None),
                  progress=False)


def test_gptq_from_saved_statistics_equals_in_memory(calibrated, tmp_path):
    """The artifact's float32 Grams, read one layer at a time, give the codes the in-memory statistics give."""
    from qdit4sr.calibration.stats import ActivationStats, LazyGrams

    _, _, stats = calibrated
    stats.save(tmp_path)
    loaded = ActivationStats.load(tmp_path)
    assert isinstance(loaded.gram, LazyGrams)
    config = QDiT4SRConfig.preset("qdit4sr_plus", "w4a4", rank=4, num_segments=2)
    a, b = fresh_model(calibrated), fresh_model(calibrated)
    quantize_(a, config, stats, progress=False)
    quantize_(b, config, loaded, progress=False)
    ours, theirs = quantized_layers(a), quantized_layers(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].qweight, theirs[name].qweight), name
