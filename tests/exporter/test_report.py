"""The run report: report.md plus PNG figures, from a small synthetic bit plan and activation statistics."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from qdit4sr.calibration.plan import BitPlan, LayerPlan, QDiT4SRConfig, SoftmaxPlan
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig
from qdit4sr.exporter.report import (FIGURES, act_variance_figure, bit_grid_figure, format_value, short_layer_name,
                                     write_report)

STEPS = 8
SEGMENTS = [(0, 3), (3, 8)]
NAMES = [f"transformer_blocks.{b}.{n}" for b in range(2) for n in ("attn.to_q", "attn.to_k", "ff.net.2")]
ALL_FIGURES = {f.filename for f in FIGURES.values()}


@pytest.fixture
def plan() -> BitPlan:
    act = [(4, 3), (5, 4), (3, 3), (6, 5), (4, 4), (2, 16)]
    layers = [LayerPlan(name=n, in_features=64, out_features=64 * (1 + i % 2), weight_bits=3 + i % 3,
                        weight_variance=10.0 ** -(i + 1), act_bits=list(a), act_scales=[0.1, 0.2])
              for i, (n, a) in enumerate(zip(NAMES, act))]
    return BitPlan(config=QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=2),
                   timesteps=[1000.0 - 125.0 * t for t in range(STEPS)], segments=list(SEGMENTS), layers=layers,
                   stats={"vasmp_exact": True})


@pytest.fixture
def stats() -> ActivationStats:
    rng = np.random.default_rng(0)
    v = np.exp(rng.normal(size=(len(NAMES), 1)) + np.linspace(0, 2, STEPS)[None] * rng.normal(size=(len(NAMES), 1)))
    return ActivationStats(list(NAMES), [1000.0 - 125.0 * t for t in range(STEPS)], v, np.sqrt(v) * 4,
                           CalibrationConfig(num_images=2))


@pytest.fixture
def crops() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for name in ("bicubic", "FP", "W4A4", "HR")}


SUMMARY = {"PSNR vs FP (dB)": 31.2468, "segments": 2, "model size (bytes)": 1234567, "act budget met": True,
           "skipped": ["TensorRT engines: tensorrt is not installed", "profiling"]}


def _links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _check_png(path, min_side: int = 150) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min(w, h) >= min_side and max(w, h) < 6000, (path.name, w, h)
    return w, h


def test_full_report_writes_every_figure_and_table(tmp_path, plan, stats, crops):
    report = write_report(tmp_path / "out", plan, stats, crops, SUMMARY)
    assert report == tmp_path / "out" / "report.md"
    # Nothing but the report and its figures: no temporary files left behind.
    assert {p.name for p in report.parent.iterdir()} == ALL_FIGURES | {"report.md"}
    for name in ALL_FIGURES:
        _check_png(report.parent / name)
    w, h = _check_png(report.parent / "comparison.png")
    assert w > 2 * h  # four crops side by side

    text = report.read_text()
    assert text.startswith("# ") and "W4A4" in text.splitlines()[0]
    assert sorted(_links(text)) == sorted(ALL_FIGURES)
    for value in ("31.25", "1,234,567", "| segments | 2 |", "| act budget met | yes |"):
        assert value in text
    assert "skipped" not in {row.split("|")[1].strip() for row in text.splitlines() if row.startswith("| ")}
    assert "- TensorRT engines: tensorrt is not installed" in text and "- profiling" in text
    # Segment rows: steps, timestep range, mean activation bits over layers, histogram of widths.
    assert "| 0 | 0 to 2 | 1000.0 to 750.0 | 4.00 | 2: 1, 3: 1, 4: 2, 5: 1, 6: 1 |" in text
    assert "| 1 | 3 to 7 | 625.0 to 125.0 | 5.83 | 3: 2, 4: 2, 5: 1, FP16: 1 |" in text
    # Hyper-parameters and solver flags.
    assert "| num_segments | 2 |" in text and "| decomposition | hsvd |" in text and "| vasmp_exact | yes |" in text
    for fig in FIGURES.values():
        assert fig.caption in text


def test_softmax_line_states_the_bits_and_logit_range(tmp_path, plan):
    assert "Softmax input: full precision." in write_report(tmp_path / "fp", plan, None, None, {}).read_text()
    plan.softmax = [SoftmaxPlan("transformer_blocks.0.attn.core", 8, [0.05, 0.1]),
                    SoftmaxPlan("transformer_blocks.1.attn.core", 8, [0.02, 0.04])]
    text = write_report(tmp_path / "q", plan, None, None, {}).read_text()
    assert "Softmax input: 8-bit static Q/DQ in 2 attention cores, logit range +-2.54 to +-12.7" in text


def test_missing_inputs_omit_their_figures(tmp_path, plan):
    report = write_report(tmp_path, plan, None, None, {"segments": 2})
    text = report.read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "bit_grid.png", "weight_bits.png"}
    assert sorted(_links(text)) == ["bit_grid.png", "weight_bits.png"]
    assert "no activation statistics were given" in text and "no image crops were given" in text
    assert "Nothing was skipped." in text


def test_rerun_without_crops_removes_the_stale_figure(tmp_path, plan, stats, crops):
    write_report(tmp_path, plan, stats, crops, {})
    assert (tmp_path / "comparison.png").is_file()
    text = write_report(tmp_path, plan, stats, None, {}).read_text()
    assert not (tmp_path / "comparison.png").exists()
    assert "comparison.png" not in _links(text)


def test_bit_grid_maps_bits_to_discrete_colours(plan):
    fig = bit_grid_figure(plan)
    grid_ax, weight_ax, bar_ax = fig.axes
    values = [2, 3, 4, 5, 6, 16]  # every activation and weight width in the plan, FP last
    index = np.asarray(grid_ax.images[0].get_array())
    assert index.shape == (len(NAMES), STEPS)
    np.testing.assert_array_equal(np.take(values, index), plan.act_bits_grid())
    np.testing.assert_array_equal(np.take(values, np.asarray(weight_ax.images[0].get_array())[:, 0]),
                                  plan.weight_bits())
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["2", "3", "4", "5", "6", "FP16"]
    assert [t.get_text() for t in grid_ax.get_yticklabels()] == [short_layer_name(n) for n in NAMES]
    # One dashed boundary per segment start after the first, between steps 2 and 3.
    assert [line.get_xdata()[0] for line in grid_ax.get_lines()] == [2.5]


def test_act_variance_highlights_the_extremes(stats):
    ax = act_variance_figure(stats, SEGMENTS).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    mean = np.log(stats.second_moment).mean(1)
    assert any(short_layer_name(NAMES[int(np.argmax(mean))]) in l and "largest" in l for l in labels)
    assert any(short_layer_name(NAMES[int(np.argmin(mean))]) in l and "smallest" in l for l in labels)
    assert ax.get_yscale() == "log"


def test_bad_crop_is_rejected(tmp_path, plan):
    with pytest.raises(ValueError, match="uint8"):
        write_report(tmp_path, plan, None, {"FP": np.zeros((8, 8, 3), dtype=np.float32)}, {})
    assert not (tmp_path / "report.md").exists()


def test_helpers():
    assert short_layer_name("transformer_blocks.3.attn.to_q") == "b3.attn.to_q"
    assert short_layer_name("proj_out") == "proj_out"
    assert format_value(0.123456) == "0.1235"
    assert format_value(1234.5) == "1,234.50"
    assert format_value([2, 8]) == "2, 8"
    assert format_value("a|b") == "a\\|b"
    assert format_value(None) == "-"


def test_quality_section_gives_psnr_of_quantized_vs_fp_and_hr(tmp_path, plan):
    from qdit4sr.models.images import psnr

    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    fp = np.clip(hr.astype(int) + rng.integers(-8, 9, hr.shape), 0, 255).astype(np.uint8)
    q = np.clip(fp.astype(int) + rng.integers(-3, 4, hr.shape), 0, 255).astype(np.uint8)
    crops = {"HR": hr, "bicubic": hr // 2, "FP": fp, "quantized": q}
    text = write_report(tmp_path, plan, None, crops, {}).read_text()
    section = text.split("## Quality on the comparison crop")[1].split("##")[0]
    # Brute force: PSNR = 10 log10(255^2 / MSE) in float64.
    mse = np.mean((q.astype(np.float64) - fp) ** 2)
    assert f"| quantized | FP | {10 * np.log10(255 ** 2 / mse):.2f} dB |" in section
    assert f"| quantized | HR | {psnr(q, hr):.2f} dB |" in section
    assert f"| FP | HR | {psnr(fp, hr):.2f} dB |" in section and "| bicubic | HR |" in section
    assert "Quality on the comparison crop" not in write_report(tmp_path, plan, None, None, {}).read_text()


def _uniform_plan(precision: str, method: str = "qdit4sr") -> BitPlan:
    config = QDiT4SRConfig.preset(method, precision, num_segments=2)
    a = int(config.act_bits)
    layers = [LayerPlan(name=n, in_features=64, out_features=64, weight_bits=int(config.weight_bits),
                        weight_variance=1e-3, act_bits=[a, a], act_scales=[0.1, 0.2]) for n in NAMES]
    return BitPlan(config=config, timesteps=[1000.0 - 125.0 * t for t in range(STEPS)], segments=list(SEGMENTS),
                   layers=layers)


def test_report_does_not_claim_timestep_bits_where_there_are_none(tmp_path, plan):
    a16 = write_report(tmp_path / "a16", _uniform_plan("w4a16"), None, None, {}).read_text()
    assert "full precision (A16)" in a16 and "same function" in a16
    assert "VaTMP moving bits" not in a16 and "per layer and segment (VaTMP" not in a16
    a6 = write_report(tmp_path / "a6", _uniform_plan("w6a6", "hsvd"), None, None, {}).read_text()
    assert "(VaTMP) are off in this method: every layer keeps A6" in a6 and "VaTMP moving bits" not in a6
    a4 = write_report(tmp_path / "a4", plan, None, None, {}).read_text()
    assert "per layer and segment (VaTMP" in a4 and "VaTMP moving bits" in a4
