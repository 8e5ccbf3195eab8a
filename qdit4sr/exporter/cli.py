"""Command line: `qdit4sr-export`, `qdit4sr-upscale` and `qdit4sr-lint-trt`."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from ..calibration.plan import QDiT4SRConfig
from .stages import (ExportError, ExportSettings, StageLog, build_trt_engines, calibrate, comparison_crops, export,
                     folder_size, load_pipeline, prepare_out_dir, quantize, write_run_report)
from .trt_lint import lint_trt_command  # noqa: F401  (entry point qdit4sr-lint-trt)

METHODS = ("qdit4sr", "hsvd_vasmp", "hsvd", "svdquant", "rtn")


def default_rank(width: int) -> int:
    """The paper's rank 32 at width 1536, scaled down for narrower models so branches stay small."""
    return max(4, round(32 * width / 1536))


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _check_precision(ctx, param, value: str) -> str:
    try:
        QDiT4SRConfig.from_precision(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return value.lower()


def _summary(folder: Path, plan, manifest, log: StageLog, fp16_bytes: int) -> dict[str, str]:
    """What the run produced, label -> value: printed at the end and put into the report."""
    weight_bytes = folder_size(folder, "weights.bin")
    graphs = sorted(folder.glob("segment_*.onnx"))
    graph_bytes = sum(p.stat().st_size for p in graphs)
    engines = sorted(p.name for p in folder.glob("*.plan"))
    rows = {
        "precision": f"{manifest.precision}  (mean weight bits {plan.mean_weight_bits():.2f}, "
                     f"mean activation bits {plan.mean_act_bits():.2f})",
        "segments": f"{len(plan.segments)}: " + ", ".join(f"steps {a}-{b - 1}" for a, b in plan.segments),
        "weights": f"{weight_bytes / 2**20:.2f} MiB in weights.bin, shared by every segment "
                   f"(fp16 transformer {fp16_bytes / 2**20:.2f} MiB: {fp16_bytes / max(weight_bytes, 1):.2f}x smaller)",
        "graphs": f"{len(graphs)} files, {graph_bytes / 2**20:.2f} MiB of graph structure",
        "manifest": str(folder / "manifest.json"),
        "engines": ", ".join(engines) if engines else "none",
        "report": str(folder / "report" / "report.md"),
    }
    if log.reused:
        rows["reused"] = f"{', '.join(log.reused)} (cached from an earlier run)"
    return rows


def _summary_lines(rows: dict[str, str], skipped: list[str]) -> list[str]:
    return [f"{key:16s} {value}" for key, value in rows.items()] + [f"{'skipped':16s} {s}" for s in skipped]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--precision", default="w4a4", show_default=True, callback=_check_precision,
              help="Weight and activation bit budget, w<bits>a<bits> (e.g. w4a4, w4a6, w8a8; a16 keeps activations FP).")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for graphs, engines, manifest and report.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="DiT4SR folder (transformer/ plus vae/ or codec.json); default: the embedded tiny model.")
@click.option("--variant", type=click.Choice(["dit4sr_q", "dit4sr_r1"]), default=None,
              help="Override the checkpoint variant recorded in its config.")
@click.option("--method", type=click.Choice(METHODS), default="qdit4sr", show_default=True,
              help="Full Q-DiT4SR or one of the ablation baselines.")
@click.option("--segments", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Timestep segments (one graph / engine each) shared by all layers.")
@click.option("--calib-images", type=click.Path(path_type=Path), default=None,
              help="Folder of LR calibration images; default: crops of the bundled photos.")
@click.option("--calib-count", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--rank", type=click.IntRange(0, 1024), default=None,
              help="Global low-rank branch rank [default: 32 at DiT4SR's width 1536, scaled with the model width].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["onnx", "trt"]), default="trt", show_default=True,
              help="onnx: portable ONNX graphs; trt: also plugin graphs and TensorRT engines where possible.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder from another run.")
def export_command(precision, out, model, variant, method, segments, calib_images, calib_count, rank, seed, backend,
                   force):
    """Quantize a DiT4SR transformer with Q-DiT4SR and export one graph/engine per timestep segment."""
    import torch

    from ..engines.manifest import ManifestError, transformer_hash
    from ..models.loading import CheckpointError

    torch.manual_seed(seed)
    settings = ExportSettings(precision=precision, method=method, model=None if model is None else str(model),
                              variant=variant, segments=segments, rank=rank, seed=seed,
                              calib_images=None if calib_images is None else str(calib_images),
                              calib_count=calib_count, backend=backend)
    log = StageLog()
    try:
        pipe = load_pipeline(settings)
        if settings.rank is None:
            settings = replace(settings, rank=default_rank(pipe.transformer.inner_dim))
        settings.quant_config()
        model_hash = transformer_hash(pipe.transformer)
        fp16_bytes = sum(p.numel() * 2 for p in pipe.transformer.parameters())
        resuming = prepare_out_dir(out, settings, model_hash, force)
        if resuming:
            click.echo(f"resuming the run in {out}")
        stats = calibrate(pipe, settings, out, log)
        plan = quantize(pipe, stats, settings, out, log)
        manifest = export(pipe, plan, settings, out, model_hash, log)
        build_trt_engines(settings, out, log)
        crops = comparison_crops(settings, pipe, log)
        summary = _summary(out, plan, manifest, log, fp16_bytes)
        write_run_report(out, plan, stats, crops, {"skipped": list(log.skipped), **summary})
    except KeyboardInterrupt:
        _fail(f"interrupted; finished stages stay cached in {out} and a rerun resumes from there", 130)
    except (ExportError, CheckpointError, ManifestError, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    click.echo("\n".join(_summary_lines(summary, log.skipped)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--engines", "engines", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder written by qdit4sr-export.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def upscale_command(image, engines, output, backend, seed):
    """Super-resolve IMAGE x4 with an exported folder."""
    from PIL import Image, UnidentifiedImageError

    from ..engines.manifest import ManifestError
    from ..engines.runtime import load_exported_pipeline
    from ..models.loading import atomic_write

    if not image.is_file():
        _fail(f"image {image} does not exist")
    try:
        with Image.open(image) as im:
            if im.mode not in ("RGB", "RGBA", "L"):
                _fail(f"image mode {im.mode} is not supported; use RGB or greyscale")
            lr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        _fail(f"{image} is not a readable image ({e})")
    try:
        pipe = load_exported_pipeline(engines, backend=backend)
        sr = pipe.upscale(lr, seed=seed)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, lambda tmp: Image.fromarray(sr).save(tmp, format="PNG"))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except (ManifestError, ValueError, OSError, RuntimeError) as e:
        _fail(str(e).splitlines()[0])
    click.echo(f"wrote {output} ({sr.shape[1]}x{sr.shape[0]})")
