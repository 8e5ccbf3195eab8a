"""Image quality of the Q-DiT4SR ablation rows on the embedded tiny model and the held-out bundled photos.

    python bench/eval_quality.py [--rank R] [--crop 128] [--out FILE] [--model DIR] [--threads 2]

Rows: FP, then RTN, SVDQuant-style (global rank-r branch, uniform bits), H-SVD, H-SVD + VaSMP and the paper's
full Q-DiT4SR, then the additions beyond the paper: H-SVD with its FP budget split per layer by the quantized
error, that plus GPTQ error compensation of the residue, split + GPTQ + VaSMP + VaTMP (with and without the
activation clip search), and the new full method (split + activation-aware GPTQ + VaSMP + VaTMP), at W4A6
and W4A4; each precision followed by two rows for the `cpu` graph flavour (per-channel INT8 weights that
onnxruntime runs as integer matmuls): option 1, the full Q-DiT4SR with its group-64 grid re-expressed per
channel (the torch model of the cpu graphs, `cpu_reference_`), and option 2, Q-DiT4SR quantized per output
channel with at most 7 weight bits (CPU_EXACT_CONFIG), whose portable and cpu graphs compute the same; plus
a global-only SVD given H-SVD's full-precision budget at W4A4. By default the rank is the one
`qdit4sr-export` uses for the model's width (same settings as the export). The activation
statistics are collected once (on training-photo crops, never the held-out photos) and shared by every row,
so rows differ only in the method. Columns: PSNR / SSIM against the HR photo (mean over images), PSNR
against the FP model's output, mean weight bits (size-weighted), mean activation bits (over layers and
sampler steps), timestep segments, and the deployed size of the quantized linear layers.

The table goes to stdout (and to --out); progress goes to stderr.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn as nn

# Runs from a checkout as well as from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.calibration import api
from qdit4sr.calibration.api import quantize_, quantized_layers
from qdit4sr.calibration.cpu_weights import CPU_EXACT_CONFIG, cpu_reference_
from qdit4sr.calibration.hsvd import HSVDConfig, equal_budget_svd_rank
from qdit4sr.calibration.layers import example_inputs, used_linears
from qdit4sr.calibration.plan import BitPlan, QDiT4SRConfig, default_rank
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig, collect_activation_stats
from qdit4sr.models.evaluate import EvalImage, held_out_set
from qdit4sr.models.images import psnr, ssim
from qdit4sr.models.pipeline import DEFAULT_MODEL_DIR, DiT4SRPipeline

PRECISIONS = ("w4a6", "w4a4")
# (row key, preset, label, config overrides)
ABLATION = (("rtn", "rtn", "RTN", {}), ("svdquant", "svdquant", "SVDQuant-style", {}), ("hsvd", "hsvd", "H-SVD", {}),
            ("hsvd_vasmp", "hsvd_vasmp", "H-SVD + VaSMP", {}), ("qdit4sr", "qdit4sr", "Q-DiT4SR (paper, full)", {}),
            ("hsvd_split", "hsvd_split", "H-SVD, budget split", {}),
            ("hsvd_split_gptq", "hsvd_split_gptq", "H-SVD split + GPTQ", {}),
            ("plus_plain_gptq", "qdit4sr_plus", "split + GPTQ + VaSMP + VaTMP", {"error_compensation": "gptq"}),
            ("plus_aclip", "qdit4sr_plus", "split + GPTQ + VaSMP + VaTMP + activation clip search",
             {"error_compensation": "gptq", "act_clip_search": True}),
            ("qdit4sr_plus", "qdit4sr_plus", "Q-DiT4SR+ (split + activation-aware GPTQ + VaSMP + VaTMP)", {}),
            ("plus_act_aclip", "qdit4sr_plus", "Q-DiT4SR+ + activation clip search", {"act_clip_search": True}))
FP16_BYTES = 2
_START = time.perf_counter()


@dataclass
class Row:
    method: str
    precision: str
    psnr_hr: float
    ssim_hr: float
    psnr_fp: float | None       # None for the FP row itself
    weight_bits: float
    act_bits: float
    segments: int | None
    size_bytes: int


def log(message: str) -> None:
    click.echo(f"[{time.perf_counter() - _START:7.1f}s] {message}", err=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- sizes ---------------------------------------------------------------------------------------------

def fp16_size(linears: dict[str, nn.Linear]) -> int:
    """Bytes of the layers' weights and biases stored as fp16."""
    return sum((m.weight.numel() + (0 if m.bias is None else m.bias.numel())) * FP16_BYTES for m in linears.values())


def deployed_size(model: nn.Module) -> int:
    """Bytes of the quantized layers as deployed: packed b-bit residue, its scales (fp16 group-wise, float32
    per channel), fp16 bias and branches."""
    total = 0
    for layer in quantized_layers(model).values():
        total += math.ceil(layer.qweight.numel() * layer.weight_bits / 8)
        total += layer.weight_scales.numel() * layer.weight_scales.element_size()
        fp = (layer.bias, layer.up, layer.down, layer.block_sigma, layer.block_u, layer.block_v)
        total += sum(t.numel() for t in fp if t is not None) * FP16_BYTES
    return total


def cpu_deployed_size(model: nn.Module) -> int:
    """Bytes of the quantized layers in the cpu graphs: one INT8 byte per weight, float32 channel scales,
    fp16 bias and branches."""
    total = 0
    for layer in quantized_layers(model).values():
        total += layer.qweight.numel() + 4 * layer.out_features
        fp = (layer.bias, layer.up, layer.down, layer.block_sigma, layer.block_u, layer.block_v)
        total += sum(t.numel() for t in fp if t is not None) * FP16_BYTES
    return total


@contextlib.contextmanager
def shared_decompositions():
    """Let quantize_ reuse the branch/residue split of a weight it has already split with the same settings.

    The split depends on the weight and the decomposition settings only, never on the bit widths, and
    H-SVD's block-shape search costs more than everything else in quantize_; six rows share one H-SVD
    split, so each weight is decomposed once instead of six times. Results are identical either way.
    """
    cache: dict[tuple, tuple] = {}
    original = api.split_weight

    def split_weight(weight: torch.Tensor, config: QDiT4SRConfig, device=None):
        digest = hashlib.sha1(weight.detach().float().cpu().numpy().tobytes()).hexdigest()
        # The budget split scores its candidates with the residue quantizer at the budget's bits.
        key = (digest, tuple(weight.shape), config.decomposition, config.rank, config.hadamard, config.group_size,
               config.seed, round(config.weight_bits), config.scale_search, config.storage_dtype)
        if key not in cache:
            cache[key] = original(weight, config, device)
        residue, branches = cache[key]
        return residue.clone(), branches

    api.split_weight = split_weight
    try:
        yield
    finally:
        api.split_weight = original


# -- evaluation ----------------------------------------------------------------------------------------

def upscale_all(pipe: DiT4SRPipeline, images: list[EvalImage], seed: int) -> list[np.ndarray]:
    return [pipe.upscale(im.lr, seed=seed) for im in images]


def quality(outputs: list[np.ndarray], images: list[EvalImage], fp: list[np.ndarray] | None) -> dict:
    return {"psnr_hr": float(np.mean([psnr(o, im.hr) for o, im in zip(outputs, images)])),
            "ssim_hr": float(np.mean([ssim(o, im.hr) for o, im in zip(outputs, images)])),
            "psnr_fp": None if fp is None else float(np.mean([psnr(o, f) for o, f in zip(outputs, fp)]))}


def quantized_row(base: DiT4SRPipeline, method: str, config: QDiT4SRConfig, stats: ActivationStats,
                  images: list[EvalImage], fp: list[np.ndarray], seed: int, *, cpu: bool = False
                  ) -> tuple[Row, BitPlan]:
    """Quantize a copy of the FP pipeline with `config`, upscale the images and score them; `cpu`: as the
    cpu graphs compute it (residues in the cpu layout) and sized as they store it."""
    # A copy rather than a reload: every row then starts from the very weights the FP row used.
    pipe = copy.deepcopy(base)
    t0 = time.perf_counter()
    plan = quantize_(pipe.transformer, config, stats, progress=False)
    size = (cpu_deployed_size if cpu else deployed_size)(pipe.transformer)
    if cpu:
        cpu_reference_(pipe.transformer)
    t1 = time.perf_counter()
    outputs = upscale_all(pipe, images, seed)
    q = quality(outputs, images, fp)
    precision = f"W{config.weight_bits:g}A{config.act_bits:g}"
    log(f"{precision} {method}: quantize {t1 - t0:.1f}s, upscale {time.perf_counter() - t1:.1f}s, "
        f"PSNR vs FP {q['psnr_fp']:.2f} dB")
    row = Row(method, precision, q["psnr_hr"], q["ssim_hr"], q["psnr_fp"], plan.mean_weight_bits(),
              plan.mean_act_bits(), len(plan.segments), size)
    return row, plan


def equal_budget_ranks(plan: BitPlan) -> list[int]:
    """Per layer, the global-only SVD rank whose FP parameters match what H-SVD spent on that layer."""
    hsvd = HSVDConfig(method="hsvd", rank=plan.config.rank, seed=plan.config.seed)
    return [equal_budget_svd_rank(l.out_features, l.in_features, hsvd,
                                  None if l.block_shape is None else tuple(l.block_shape)) for l in plan.layers]


# -- output --------------------------------------------------------------------------------------------

def format_table(rows: list[Row], marks: dict[str, str]) -> str:
    lines = ["| method | precision | PSNR (HR) | SSIM (HR) | PSNR vs FP | mean W bits | mean A bits | segments "
             "| size (KiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method}{marks.get(r.method, '')} | {r.precision} | {r.psnr_hr:.2f} | {r.ssim_hr:.4f} | "
                     f"{'-' if r.psnr_fp is None else f'{r.psnr_fp:.2f}'} | {r.weight_bits:.2f} | "
                     f"{r.act_bits:.2f} | {'-' if r.segments is None else r.segments} | "
                     f"{r.size_bytes / 1024:.1f} |")
    return "\n".join(lines)


def model_description(model_dir: Path) -> str:
    name = "embedded tiny default" if model_dir.resolve() == DEFAULT_MODEL_DIR.resolve() else model_dir.name
    meta = model_dir / "training.json"
    if meta.is_file():
        steps = json.loads(meta.read_text()).get("train", {}).get("steps")
        if steps is not None:
            return f"{name} ({steps} training steps)"
    return name


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEFAULT_MODEL_DIR, show_default="the embedded tiny model")
@click.option("--crop", type=int, default=128, show_default=True, help="HR centre-crop side of each held-out photo.")
@click.option("--calib-images", type=int, default=32, show_default=True, help="Calibration crops (training photos).")
@click.option("--rank", type=int, default=None, show_default="qdit4sr-export's rank for the model width",
              help="Global branch rank of the SVD/H-SVD rows.")
@click.option("--methods", default=None, help="Comma-separated presets to run (default: every row).")
@click.option("--precisions", default=",".join(PRECISIONS), show_default=True, help="Comma-separated precisions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (markdown) to this file.")
def main(model_dir: Path, crop: int, calib_images: int, rank: int | None, methods: str | None, precisions: str,
         seed: int, threads: int, out: Path | None) -> None:
    torch.set_num_threads(threads)
    seed_everything(seed)
    command = shlex.join(["python", "bench/eval_quality.py", *sys.argv[1:]])

    pipe = DiT4SRPipeline.from_folder(model_dir)
    export_rank = default_rank(pipe.transformer.inner_dim)
    rank = export_rank if rank is None else rank
    ablation = ABLATION if methods is None else tuple(a for a in ABLATION if a[0] in methods.split(","))
    images = held_out_set(crop)
    log(f"model: {model_description(model_dir)}; {len(images)} held-out photos at {crop}px, "
        f"{pipe.config.num_inference_steps} sampler steps")
    fp = upscale_all(pipe, images, seed)
    layers = used_linears(pipe.transformer, example_inputs(pipe.transformer))
    rows = [Row("FP", "FP16", **quality(fp, images, None), weight_bits=16.0, act_bits=16.0, segments=None,
                size_bytes=fp16_size(layers))]
    log(f"FP: PSNR (HR) {rows[0].psnr_hr:.2f} dB")
    stats = collect_activation_stats(pipe, layers, CalibrationConfig(num_images=calib_images, seed=seed, gram=True,
                                                                         act_hist=True),
                                     progress=False)
    log(f"calibrated {len(stats.layers)} layers over {len(stats.timesteps)} steps on {calib_images} crops")

    plans: dict[tuple[str, str], BitPlan] = {}
    with shared_decompositions():
        for precision in precisions.lower().split(","):
            for key, preset, label, overrides in ablation:
                method = f"{label} (rank {rank})" if preset == "svdquant" else label
                config = QDiT4SRConfig.preset(preset, precision, rank=rank, seed=seed, **overrides)
                row, plans[key, precision] = quantized_row(pipe, method, config, stats, images, fp, seed)
                rows.append(row)
            # The cpu flavour's two ways to per-channel INT8 weights.
            config = QDiT4SRConfig.preset("qdit4sr", precision, rank=rank, seed=seed)
            rows.append(quantized_row(pipe, "Q-DiT4SR, cpu graph: group-64 re-expressed (1)", config, stats, images,
                                      fp, seed, cpu=True)[0])
            config = QDiT4SRConfig.preset("qdit4sr", precision, rank=rank, seed=seed, **CPU_EXACT_CONFIG)
            rows.append(quantized_row(pipe, "Q-DiT4SR per channel, cpu graph (2)", config, stats, images, fp, seed,
                                      cpu=True)[0])

        # The honest baseline: H-SVD spends extra FP parameters on its blocks; give a global-only SVD as many.
        eq_note, label = None, None
        if ("hsvd", "w4a4") in plans:
            ranks = equal_budget_ranks(plans["hsvd", "w4a4"])
            eq_rank = min(round(float(np.mean(ranks))), min(min(l.in_features, l.out_features)
                                                            for l in plans["hsvd", "w4a4"].layers))
            label = f"SVD, equal FP budget (rank {eq_rank})"
            config = QDiT4SRConfig.preset("svdquant", "w4a4", rank=eq_rank, seed=seed)
            row, _ = quantized_row(pipe, label, config, stats, images, fp, seed)
            rows.append(row)
            hsvd_size = next(r.size_bytes for r in rows if r.method == "H-SVD" and r.precision == "W4A4")
            if min(ranks) == max(ranks):
                eq_note = (f"global-only SVD at rank {eq_rank}, the rank whose FP parameters match H-SVD's (rank "
                                     f"{rank} plus the block branch) in every layer.")
            else:
                eq_note = (f"the per-layer equal-budget ranks range from {min(ranks)} to {max(ranks)}, which one config "
                           f"cannot express, so every layer uses their mean, rank {eq_rank}; its size is "
                           f"{row.size_bytes / hsvd_size:.1%} of H-SVD's at W4A4.")

    rank_note = (f"Rank {rank}: what `qdit4sr-export` uses for this model's width ({pipe.transformer.inner_dim}), with "
                 f"the export's other defaults (group 64, 4 segments, 32 calibration crops, seed 0; this run: "
                 f"{calib_images} crops, seed {seed})." if rank == export_rank else
                 f"Rank {rank}, not the export's default (rank {export_rank} for width {pipe.transformer.inner_dim}).")
    notes = [
        f"Model: {model_description(model_dir)}. {len(images)} held-out photos "
        f"({', '.join(im.name for im in images)}), "
        f"{crop}px HR centre crops, x4. Calibration: {calib_images} crops of the training photos, collected once "
        f"and shared by every row. Seed {seed}, {threads} threads.",
        "Size: the quantized blocks' linear layers as deployed (packed integer residue at its bits, fp16 group "
        "scales or float32 channel scales, fp16 bias and low-rank branches); the cpu rows as the cpu graphs "
        "store them (one INT8 byte per weight); the FP row counts the same layers at fp16 (the FP outputs "
        "themselves are computed in fp32).",
        "cpu rows, computed by the torch model of the cpu graphs (which the tests match to float32 rounding): "
        "(1) the full Q-DiT4SR model with every group-64 INT4 residue re-expressed on a per-channel grid of 127 "
        "levels (|code| <= 63, within half a step of the portable weight); mean W bits are the plan's; "
        "(2) the full Q-DiT4SR quantized per output channel with at most 7 weight bits at quantize time "
        "(group_size=None, weight_bit_range=(2, 7)), kept exactly by the cpu graph.",
        "Mean W bits are weighted by layer size; mean A bits average over layers and sampler steps.",
        rank_note,
        *([f"\\* {eq_note}"] if eq_note else []),
    ]
    text = "\n".join([format_table(rows, {label: "\\*"} if label else {}), "", *notes, "",
                      f"Command: `{command}` ({time.perf_counter() - _START:.0f} s)"]) + "\n"
    click.echo(text)
    if out is not None:
        out.write_text(text)
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
