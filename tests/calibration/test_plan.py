import json

import pytest

from qdit4sr.calibration.plan import (METHOD_PRESETS, BitPlan, LayerPlan, QDiT4SRConfig, QuantizationSettings,
                                     default_rank, step_to_segment)


def _plan(segments=((0, 3), (3, 8)), bits=((4, 6), (2, 8))):
    layers = [LayerPlan(name=f"l{i}", in_features=64, out_features=64 * (i + 1), weight_bits=3 + i,
                        weight_variance=0.1, act_bits=list(b), act_scales=[0.1, 0.2]) for i, b in enumerate(bits)]
    return BitPlan(config=QDiT4SRConfig.from_precision("w4a4"), timesteps=[float(t) for t in range(8, 0, -1)],
                   segments=list(segments), layers=layers)


def test_precision_parsing_and_presets():
    c = QDiT4SRConfig.from_precision("W4A6")
    assert (c.weight_bits, c.act_bits, c.use_temporal) == (4.0, 6.0, False)
    assert QDiT4SRConfig.from_precision("w4a4").use_temporal
    assert not QDiT4SRConfig.from_precision("w8a16").use_temporal
    assert QDiT4SRConfig.preset("svdquant", "w4a4").decomposition == "svd"
    for bad in ("w4", "int4", "w9a4", "w4a1"):
        with pytest.raises(ValueError):
            QDiT4SRConfig.from_precision(bad)
    with pytest.raises(ValueError, match="preset"):
        QDiT4SRConfig.preset("nope", "w4a4")


def test_json_round_trip_and_grid():
    plan = _plan()
    again = BitPlan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    grid = again.act_bits_grid()
    assert grid.shape == (2, 8)
    assert grid[0].tolist() == [4, 4, 4, 6, 6, 6, 6, 6]
    assert again.segment_of_step() == [0, 0, 0, 1, 1, 1, 1, 1]
    # Weighted by layer size: 64*64 at 3 bits and 64*128 at 4 bits.
    assert again.mean_weight_bits() == pytest.approx((3 * 1 + 4 * 2) / 3)


def test_step_to_segment_map():
    assert step_to_segment([(0, 1), (1, 4), (4, 6)]) == [0, 1, 1, 1, 2, 2]
    assert step_to_segment([]) == []
    plan = _plan(segments=((0, 5), (5, 8)))
    assert plan.segment_of_step() == step_to_segment(plan.segments) == [0] * 5 + [1] * 3


def test_method_presets_and_quantization_settings():
    assert list(METHOD_PRESETS) == ["qdit4sr", "hsvd_vasmp", "hsvd", "svdquant", "rtn",  # the paper's ablation
                                    "hsvd_split", "hsvd_split_gptq", "qdit4sr_plus"]      # beyond the paper
    assert QDiT4SRConfig.preset("qdit4sr_plus", "w4a4").error_compensation == "gptq_act"
    assert all(QDiT4SRConfig.preset(m, "w4a4").decomposition == METHOD_PRESETS[m]["decomposition"]
               for m in METHOD_PRESETS)
    assert (default_rank(1536), default_rank(128), default_rank(3072)) == (32, 4, 64)
    settings = QuantizationSettings("w4a6", "hsvd", segments=2)
    with pytest.raises(ValueError, match="for_width"):
        settings.config()
    config = settings.for_width(1536).config(seed=3)
    assert config == QDiT4SRConfig.preset("hsvd", "w4a6", num_segments=2, rank=32, seed=3)
    assert QuantizationSettings(rank=8).for_width(1536).rank == 8


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(segments=[[0, 3], [4, 8]]), "contiguous"),
    (lambda d: d.update(segments=[[0, 3], [3, 7]]), "cover"),
    (lambda d: d["layers"][0].update(act_bits=[4]), "needs 2"),
    (lambda d: d["layers"][0].update(weight_bits=9), "outside"),
    (lambda d: d["layers"][1].update(act_scales=[0.1, -1.0]), "positive"),
    (lambda d: d["config"].update(bogus=1), "unknown config"),
    (lambda d: d.pop("layers"), "missing"),
])
def test_invalid_plans_are_rejected(edit, match):
    raw = json.loads(_plan().to_json())
    edit(raw)
    with pytest.raises(ValueError, match=match):
        BitPlan.from_json(json.dumps(raw))


def test_not_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        BitPlan.from_json("{")


def test_version_1_plans_load_with_the_settings_they_were_made_with():
    raw = json.loads(_plan().to_json())
    raw["version"] = 1
    del raw["softmax"]
    for key in ("softmax_bits", "storage_dtype", "wide_group_size"):
        del raw["config"][key]
    plan = BitPlan.from_json(json.dumps(raw))
    assert plan.softmax == [] and not plan.config.quantize_softmax
    assert plan.config.storage_dtype == "float32"
    assert plan.config.group_size_for(8) == plan.config.group_size_for(4) == 64
    # the current defaults differ on all three
    fresh = QDiT4SRConfig.from_precision("w4a4")
    assert fresh.quantize_softmax and fresh.storage_dtype == "float16" and fresh.group_size_for(8) is None
