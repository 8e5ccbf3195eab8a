"""A human-readable report of a quantization run: `report.md` plus a few PNG figures.

    write_report(out_dir, plan, stats, crops, summary) -> Path of report.md

Figures (each omitted, with a note in the report, when its input is missing):

    bit_grid.png        activation bits per (layer, sampler step) as a heat map, weight bits beside it
    act_variance.png    activation second moment over the sampler steps, one line per layer (needs stats)
    weight_bits.png     per-layer residue weight variance with the bits VaSMP chose
    comparison.png      side-by-side crops, e.g. bicubic / FP / quantized / HR (needs crops)

Every file is written to a temporary name and renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..calibration.plan import BitPlan
from ..calibration.stats import ActivationStats
from ..fileio import atomic_write, atomic_write_text

__all__ = ["FIGURES", "ReportFigure", "write_report", "bit_grid_figure", "act_variance_figure", "weight_bits_figure",
           "comparison_figure", "short_layer_name", "format_value"]

REPORT_FILE = "report.md"
FP_BITS = 16               # activation "bits" that mean full precision
_DPI = 110
_MAX_LABELS = 280          # beyond this many layers, only every k-th name is printed
_INCH_PER_LAYER = 0.14


@dataclass(frozen=True)
class ReportFigure:
    filename: str
    title: str
    caption: str          # one sentence: what to look for


FIGURES: dict[str, ReportFigure] = {
    "bit_grid": ReportFigure(
        "bit_grid.png", "Activation bits per layer and sampler step",
        "Each row is a layer and each column a sampler step; colour changes at the vertical lines show VaTMP "
        "moving bits between timestep segments, and the narrow column on the right gives each layer's weight bits."),
    "act_variance": ReportFigure(
        "act_variance.png", "Activation second moment over the sampler steps",
        "Layers whose lines rise or fall steeply across the steps are the ones that gain from timestep-dependent "
        "activation bits; the labelled lines are the extremes."),
    "weight_bits": ReportFigure(
        "weight_bits.png", "Residue weight variance and VaSMP weight bits",
        "Bars are the variance of each layer's quantized residue (log scale), coloured by the weight bits VaSMP "
        "chose: high-variance layers should get the wider colours."),
    "comparison": ReportFigure(
        "comparison.png", "Visual comparison",
        "Look for textures and edges that the quantized model blurs or invents relative to the full-precision "
        "output."),
}

_STATIC_BIT_GRID_CAPTION = (
    "Each row is a layer and each column a sampler step; without timestep-dependent activation bits every row "
    "keeps one colour across the steps, and the narrow column on the right gives each layer's weight bits.")

_OMITTED = {"act_variance": "no activation statistics were given", "comparison": "no image crops were given"}


# -- small helpers ---------------------------------------------------------------------------------------

def short_layer_name(name: str) -> str:
    """'transformer_blocks.3.attn.to_q' -> 'b3.attn.to_q' (every quantized layer lives in a block)."""
    prefix = "transformer_blocks."
    return "b" + name[len(prefix):] if name.startswith(prefix) else name


def format_value(value) -> str:
    """Compact, table-safe text for a summary or hyper-parameter value."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):,}"
    elif isinstance(value, (float, np.floating)):
        v = float(value)
        text = str(v) if not math.isfinite(v) else f"{v:,.2f}" if abs(v) >= 100 else f"{v:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(format_value(v) for v in value) if value else "-"
    elif value is None:
        text = "-"
    else:
        text = str(value)
    # A pipe would end the markdown cell early; newlines would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(c) if not isinstance(c, str) else c.replace("|", "\\|")
                                for c in row) + " |" for row in rows]
    return lines


def _save(fig: Figure, path: Path) -> None:
    """Render with Agg into a temporary file next to path, then rename (atomic for readers)."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight"))


def _bit_colours(plan: BitPlan) -> dict[int, tuple]:
    """One colour per bit width the plan uses (weights and activations alike), full precision in grey.

    Both bit figures take their colours from here, so a width has the same colour in each.
    """
    from matplotlib import colormaps

    values = sorted(set(np.unique(plan.act_bits_grid()).tolist()) | set(plan.weight_bits().tolist()))
    quantized = [v for v in values if v != FP_BITS]
    cmap = colormaps["viridis"]
    colours = {v: cmap(i / max(len(quantized) - 1, 1)) for i, v in enumerate(sorted(quantized))}
    if FP_BITS in values:
        colours[FP_BITS] = (0.75, 0.75, 0.75, 1.0)
    return colours


def _ink(background: tuple) -> str:
    """Black or white text, whichever reads better on the background colour."""
    r, g, b = background[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _bit_label(bits: int) -> str:
    return "FP16" if bits == FP_BITS else f"{bits}"


def _layer_ticks(ax, n: int, names: list[str], axis: str) -> None:
    """Tick every layer when it stays readable, otherwise every k-th."""
    every = max(1, math.ceil(n / _MAX_LABELS))
    idx = list(range(0, n, every))
    labels = [short_layer_name(names[i]) for i in idx]
    size = 6 if n <= 120 else 5
    if axis == "y":
        ax.set_yticks(idx, labels, fontsize=size)
    else:
        ax.set_xticks(idx, labels, fontsize=size, rotation=90)


def _segment_lines(ax, segments: list[tuple[int, int]], label: bool = True) -> None:
    for k, (start, end) in enumerate(segments):
        if start > 0:
            ax.axvline(start - 0.5, color="red", linewidth=1.2, linestyle="--")
        if label and len(segments) > 1:
            ax.text((start + end - 1) / 2, 1.005, f"S{k}", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, color="red")


# -- figures ---------------------------------------------------------------------------------------------

def bit_grid_figure(plan: BitPlan) -> Figure:
    grid, w_bits = plan.act_bits_grid(), plan.weight_bits()
    n_layers, n_steps = grid.shape
    colours = _bit_colours(plan)
    values = sorted(colours)
    index = {v: i for i, v in enumerate(values)}
    # Bits are categories here: map them to consecutive indices so the colour bar is discrete.
    cmap = ListedColormap([colours[v] for v in values])
    norm = BoundaryNorm(np.arange(len(values) + 1) - 0.5, len(values))
    to_index = np.vectorize(index.get)

    height = min(max(3.5, _INCH_PER_LAYER * n_layers + 1.5), 40.0)
    width = min(max(6.0, 0.35 * n_steps + 4.5), 24.0)
    fig = Figure(figsize=(width, height))
    gs = fig.add_gridspec(1, 3, width_ratios=[max(n_steps, 2), 1.2, 0.3], wspace=0.08)
    ax, ax_w, ax_bar = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    image = ax.imshow(to_index(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _layer_ticks(ax, n_layers, [l.name for l in plan.layers], "y")
    steps = list(range(n_steps))
    every = max(1, math.ceil(n_steps / 25))
    ax.set_xticks(steps[::every], [str(s) for s in steps[::every]], fontsize=7)
    ax.set_xlabel("sampler step (timestep decreasing)")
    ax.set_ylabel("layer")
    _segment_lines(ax, plan.segments)
    ax.set_title(f"{FIGURES['bit_grid'].title} (A{plan.config.act_bits:g} budget)", fontsize=10, pad=14)

    ax_w.imshow(to_index(w_bits[:, None]), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax_w.set_xticks([0], ["W"], fontsize=7)
    ax_w.set_yticks([])
    ax_w.set_title("weight\nbits", fontsize=8, pad=12)
    if n_layers <= 120:  # numbers only where the cells are tall enough to hold them
        for i, b in enumerate(w_bits):
            ax_w.text(0, i, str(int(b)), ha="center", va="center", fontsize=5, color=_ink(colours[int(b)]))

    bar = fig.colorbar(image, cax=ax_bar, ticks=range(len(values)))
    bar.ax.set_yticklabels([_bit_label(v) for v in values], fontsize=7)
    bar.set_label("bits", fontsize=8)
    return fig


def _highlighted_layers(v: np.ndarray) -> dict[int, str]:
    """Indices of the layers worth a label: largest and smallest mean, and the most time-varying."""
    mean = np.log(v).mean(1)
    swing = np.log(v).max(1) - np.log(v).min(1)
    picks = {int(np.argmax(mean)): "largest", int(np.argmin(mean)): "smallest",
             int(np.argmax(swing)): "largest swing"}
    out: dict[int, str] = {}
    for i, why in picks.items():  # one layer can be two extremes at once
        out[i] = f"{out[i]}, {why}" if i in out else why
    return out


def act_variance_figure(stats: ActivationStats, segments: list[tuple[int, int]] | None = None) -> Figure:
    # Log scale: a layer that saw only zeros would vanish, so clamp to the smallest positive value.
    positive = stats.second_moment[stats.second_moment > 0]
    floor = float(positive.min()) if positive.size else 1e-12
    v = np.maximum(np.asarray(stats.second_moment, dtype=np.float64), floor)
    n_layers, n_steps = v.shape
    steps = np.arange(n_steps)
    fig = Figure(figsize=(8.5, 5.0))
    ax = fig.add_subplot()
    highlight = _highlighted_layers(v)
    for i in range(n_layers):
        if i not in highlight:
            ax.plot(steps, v[i], color="0.55", linewidth=0.5, alpha=0.45)
    palette = ["tab:red", "tab:blue", "tab:orange"]
    for colour, (i, why) in zip(palette, highlight.items()):
        ax.plot(steps, v[i], color=colour, linewidth=2.0, marker="o", markersize=3,
                label=f"{short_layer_name(stats.layers[i])} ({why})")
    ax.plot(steps, np.exp(np.log(v).mean(0)), color="black", linewidth=1.5, linestyle=":",
            label="geometric mean over layers")
    ax.set_yscale("log")
    ax.set_xlabel("sampler step (timestep decreasing)")
    ax.set_ylabel("mean of squared rotated input")
    every = max(1, math.ceil(n_steps / 25))
    ax.set_xticks(steps[::every])
    if segments is not None:
        _segment_lines(ax, segments)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"{FIGURES['act_variance'].title} ({n_layers} layers)", fontsize=10, pad=12)
    return fig


def weight_bits_figure(plan: BitPlan) -> Figure:
    n = len(plan.layers)
    variance = np.array([max(l.weight_variance, 1e-30) for l in plan.layers])
    bits = plan.weight_bits()
    colours = _bit_colours(plan)
    fig = Figure(figsize=(min(max(7.0, 0.13 * n + 2.0), 40.0), 5.0))
    ax = fig.add_subplot()
    ax.bar(np.arange(n), variance, width=0.85, color=[colours[int(b)] for b in bits])
    ax.set_yscale("log")
    # Log-scale bars have no natural base; start at a whole decade below the smallest bar so that bar
    # heights are not exaggerated by an axis that starts just under the minimum.
    ax.set_ylim(bottom=10.0 ** math.floor(math.log10(variance.min()) - 1e-9))
    ax.set_xlim(-0.7, n - 0.3)
    _layer_ticks(ax, n, [l.name for l in plan.layers], "x")
    ax.set_ylabel("residue weight variance")
    counts = Counter(int(b) for b in bits)
    ax.legend(handles=[Patch(color=colours[b], label=f"W{b}: {counts[b]} layers") for b in sorted(counts)],
              fontsize=7, title="VaSMP bits", title_fontsize=7, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{FIGURES['weight_bits'].title} (mean {plan.mean_weight_bits():.2f} bits, size-weighted)",
                 fontsize=10)
    return fig


def _check_crops(crops: dict[str, np.ndarray]) -> None:
    if not crops:
        raise ValueError("crops must name at least one image")
    for name, image in crops.items():
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"crop {name!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")


def comparison_figure(crops: dict[str, np.ndarray]) -> Figure:
    n = len(crops)
    tallest = max(np.asarray(c).shape[0] / np.asarray(c).shape[1] for c in crops.values())
    fig = Figure(figsize=(3.0 * n, 3.0 * tallest + 0.6))
    for k, (name, image) in enumerate(crops.items()):
        ax = fig.add_subplot(1, n, k + 1)
        # Nearest neighbour: the point is to see the pixels, not a smoothed version of them.
        ax.imshow(np.asarray(image), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    return fig


# -- markdown --------------------------------------------------------------------------------------------

def _segment_rows(plan: BitPlan) -> list[tuple]:
    rows = []
    for k, (start, end) in enumerate(plan.segments):
        bits = [layer.act_bits[k] for layer in plan.layers]
        hist = Counter(bits)
        histogram = ", ".join(f"{_bit_label(b)}: {hist[b]}" for b in sorted(hist))
        first, last = plan.timesteps[start], plan.timesteps[end - 1]
        steps = f"{start}" if end - start == 1 else f"{start} to {end - 1}"
        timesteps = f"{first:.1f}" if end - start == 1 else f"{first:.1f} to {last:.1f}"
        rows.append((str(k), steps, timesteps, f"{np.mean(bits):.2f}", histogram))
    return rows


QUALITY_PAIRS = (("quantized", "FP"), ("quantized", "HR"), ("FP", "HR"), ("bicubic", "HR"))


def quality_rows(crops: dict[str, np.ndarray] | None) -> list[tuple[str, str, str]]:
    """(image, reference, PSNR) for each pair of QUALITY_PAIRS that the crops hold."""
    from ..models.images import psnr

    if not crops:
        return []
    return [(a, b, f"{psnr(np.asarray(crops[a]), np.asarray(crops[b])):.2f} dB") for a, b in QUALITY_PAIRS
            if a in crops and b in crops and np.shape(crops[a]) == np.shape(crops[b])]


def _segments_text(plan: BitPlan) -> str:
    k, n, layers = len(plan.segments), plan.num_steps, len(plan.layers)
    if plan.config.act_bits == 16:
        return (f"{k} segment(s) over {n} sampler steps. Activations stay in full precision (A16), so no bits "
                f"change with the timestep: every segment's graph computes the same function.")
    if not plan.config.use_temporal:
        return (f"{k} segment(s) over {n} sampler steps. Timestep-dependent activation bits (VaTMP) are off in "
                f"this method: every layer keeps A{plan.config.act_bits:g} in every segment, and the segments differ "
                f"only in their static activation scales.")
    return (f"{k} segment(s) over {n} sampler steps; activation bits are per layer and segment (VaTMP; mean over "
            f"{layers} layers, and how many layers got each width).")


def _markdown(plan: BitPlan, summary: dict, figures: dict[str, bool],
              crops: dict[str, np.ndarray] | None = None) -> str:
    precision = f"W{plan.config.weight_bits:g}A{plan.config.act_bits:g}"
    lines = [f"# Q-DiT4SR quantization report: {precision}", ""]
    rows = [(str(k), v) for k, v in summary.items() if k != "skipped"]
    summary_table = _table(("quantity", "value"), rows) if rows else ["(no summary values given)"]
    lines += ["## Summary", ""] + summary_table + [""]

    quality = quality_rows(crops)
    if quality:
        lines += ["## Quality on the comparison crop", "",
                  "PSNR between the crops of the comparison figure (same seed for FP and quantized):", ""]
        lines += _table(("image", "against", "PSNR"), quality) + [""]

    lines += ["## Timestep segments", "", _segments_text(plan), ""]
    lines += _table(("segment", "sampler steps", "timesteps", "mean act bits", "layers per act bits"),
                    _segment_rows(plan)) + [""]
    if plan.softmax:
        ranges = [127 * min(s.scales) for s in plan.softmax] + [127 * max(s.scales) for s in plan.softmax]
        lines += [f"Softmax input: {plan.softmax[0].bits}-bit static Q/DQ in {len(plan.softmax)} attention cores, "
                  f"logit range +-{min(ranges):.3g} to +-{max(ranges):.3g} over cores and segments.", ""]
    else:
        lines += ["Softmax input: full precision.", ""]

    lines += ["## Figures", ""]
    for key, fig in FIGURES.items():
        lines.append(f"### {fig.title}")
        lines.append("")
        if figures[key]:
            caption = fig.caption if key != "bit_grid" or plan.config.use_temporal else _STATIC_BIT_GRID_CAPTION
            lines += [f"![{fig.title}]({fig.filename})", "", caption]
        else:
            lines.append(f"_Figure omitted: {_OMITTED[key]}._")
        lines.append("")

    lines += ["## Hyper-parameters", ""] + _table(("parameter", "value"), list(plan.config.to_dict().items()))
    if plan.stats:
        lines += ["", "## Solver statistics", ""] + _table(("statistic", "value"), list(plan.stats.items()))
    skipped = list(summary.get("skipped") or [])
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in skipped] if skipped else ["Nothing was skipped."])
    return "\n".join(lines) + "\n"


# -- entry point -----------------------------------------------------------------------------------------

def write_report(out_dir: str | Path, plan: BitPlan, stats: ActivationStats | None,
                 crops: dict[str, np.ndarray] | None, summary: dict) -> Path:
    """Write report.md and its figures into out_dir; returns the path of report.md.

    `summary` maps labels to values for the summary table; its optional "skipped" entry is a list of
    strings listed at the end. Figures this run does not produce are removed if an earlier run left
    them, so the folder never shows a figure that the report does not describe.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.validate()
    if crops is not None:
        _check_crops(crops)
    segments = plan.segments if stats is not None and len(stats.timesteps) == plan.num_steps else None
    # Built lazily, one at a time, so only one figure is in memory.
    builders: dict[str, Callable[[], Figure] | None] = {
        "bit_grid": lambda: bit_grid_figure(plan),
        "act_variance": None if stats is None else lambda: act_variance_figure(stats, segments),
        "weight_bits": lambda: weight_bits_figure(plan),
        "comparison": None if crops is None else lambda: comparison_figure(crops),
    }
    produced = {}
    for key, build in builders.items():
        path = out / FIGURES[key].filename
        if build is None:
            path.unlink(missing_ok=True)
        else:
            _save(build(), path)
        produced[key] = build is not None
    text = _markdown(plan, summary, produced, crops)
    report = out / REPORT_FILE
    atomic_write_text(report, text)
    return report
