"""`qdit4sr-export`: quantize a DiT4SR transformer and export one graph / engine per timestep segment."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ..calibration.plan import METHOD_PRESETS, QDiT4SRConfig, default_rank
from .common import CONTEXT_SETTINGS, fail, first_line


def _check_precision(ctx, param, value: str) -> str:
    try:
        QDiT4SRConfig.from_precision(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return value.lower()


def _summary_lines(rows: dict[str, str], skipped: list[str]) -> list[str]:
    return [f"{key:16s} {value}" for key, value in rows.items()] + [f"{'skipped':16s} {s}" for s in skipped]


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--precision", default="w4a4", show_default=True, callback=_check_precision,
              help="Weight and activation bit budget, w<bits>a<bits> (e.g. w4a4, w4a6, w8a8; a16 keeps activations FP).")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for graphs, engines, manifest and report.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="DiT4SR folder (transformer/ plus vae/ or codec.json); default: the embedded tiny model.")
@click.option("--variant", type=click.Choice(["dit4sr_q", "dit4sr_r1"]), default=None,
              help="Override the checkpoint variant recorded in its config.")
@click.option("--method", type=click.Choice(list(METHOD_PRESETS)), default="qdit4sr", show_default=True,
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

    from ..artifacts.manifest import ManifestError
    from ..exporter import stages
    from ..exporter.manifest_writer import transformer_hash
    from ..models.loading import CheckpointError

    torch.manual_seed(seed)
    settings = stages.ExportSettings(precision=precision, method=method, model=None if model is None else str(model),
                                     variant=variant, segments=segments, rank=rank, seed=seed,
                                     calib_images=None if calib_images is None else str(calib_images),
                                     calib_count=calib_count, backend=backend)
    log = stages.StageLog()
    try:
        pipe = stages.load_pipeline(settings)
        if settings.rank is None:
            settings = replace(settings, rank=default_rank(pipe.transformer.inner_dim))
        settings.quant_config()
        model_hash = transformer_hash(pipe.transformer)
        fp16_bytes = sum(p.numel() * 2 for p in pipe.transformer.parameters())
        resuming = stages.prepare_out_dir(out, settings, model_hash, force)
        if resuming:
            click.echo(f"resuming the run in {out}")
        stats = stages.calibrate(pipe, settings, out, log)
        plan = stages.quantize(pipe, stats, settings, out, log)
        manifest = stages.export(pipe, plan, settings, out, model_hash, log)
        stages.build_trt_engines(settings, out, log)
        crops = stages.comparison_crops(settings, pipe, log)
        summary = stages.run_summary(out, plan, manifest, log, fp16_bytes)
        stages.write_run_report(out, plan, stats, crops, {"skipped": list(log.skipped), **summary})
    except KeyboardInterrupt:
        fail(f"interrupted; finished stages stay cached in {out} and a rerun resumes from there", 130)
    except (stages.ExportError, CheckpointError, ManifestError, ValueError, OSError) as e:
        fail(first_line(e))
    click.echo("\n".join(_summary_lines(summary, log.skipped)))
