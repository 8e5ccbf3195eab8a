"""`qdit4sr-export`: quantize a DiT4SR transformer and export one graph / engine per timestep segment."""
from __future__ import annotations

from pathlib import Path

import click

from ..artifacts.manifest import MANIFEST_FILE
from .common import CONTEXT_SETTINGS, fail, first_line
from .options import (CALIBRATION_OPTIONS, DEVICE_OPTIONS, ENGINE_BUILD_OPTIONS, EXPORT_OPTIONS, MODEL_OPTIONS,
                      QUANTIZATION_OPTIONS, SAMPLER_OPTIONS, GroupedCommand)


def _summary_lines(rows: dict[str, str], skipped: list[str]) -> list[str]:
    return [f"{key:16s} {value}" for key, value in rows.items()] + [f"{'skipped':16s} {s}" for s in skipped]


@click.command(cls=GroupedCommand, context_settings=CONTEXT_SETTINGS)
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for graphs, engines, manifest and report.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder from another run.")
@MODEL_OPTIONS
@QUANTIZATION_OPTIONS
@CALIBRATION_OPTIONS
@SAMPLER_OPTIONS
@DEVICE_OPTIONS
@EXPORT_OPTIONS
@ENGINE_BUILD_OPTIONS
def export_command(out: Path, seed: int, force: bool, **options):
    """Quantize a DiT4SR transformer with Q-DiT4SR and export one graph/engine per timestep segment."""
    import torch

    from .. import hostmem
    from ..artifacts.manifest import ManifestError
    from ..exporter import stages
    from ..exporter.manifest_writer import transformer_hash
    from ..exporter.settings import ExportSettings
    from ..models.loading import CheckpointError

    torch.manual_seed(seed)
    # The command owns the process: freed weights and traces go back to the OS, so peak memory follows
    # the model, not the thousands of 1-100 MB tensors made and freed on the way (see qdit4sr.hostmem).
    hostmem.return_large_blocks_to_os()
    log = stages.StageLog()
    try:
        settings = ExportSettings(model=MODEL_OPTIONS.build(options), quantization=QUANTIZATION_OPTIONS.build(options),
                                  calibration=CALIBRATION_OPTIONS.build(options), sampler=SAMPLER_OPTIONS.build(options),
                                  device=DEVICE_OPTIONS.build(options), export=EXPORT_OPTIONS.build(options),
                                  engines=ENGINE_BUILD_OPTIONS.build(options), seed=seed)
        pipe = stages.load_pipeline(settings)
        settings = stages.resolve_settings(settings, pipe)
        settings.quant_config()
        model_hash = transformer_hash(pipe.transformer)
        fp16_bytes = sum(p.numel() * 2 for p in pipe.transformer.parameters())
        resuming = stages.prepare_out_dir(out, settings, model_hash, force)
        if resuming:
            click.echo(f"resuming the run in {out}")
        stats = stages.calibrate(pipe, settings, out, log)
        plan = stages.quantize(pipe, stats, settings, out, log)
        hostmem.trim()   # the decompositions' float64 temporaries, before the export's own
        manifest = stages.export(pipe, plan, settings, out, model_hash, log)
        stages.build_trt_engines(settings, out, log)
        crops = stages.comparison_crops(settings, pipe, out, model_hash, log)
        summary = stages.run_summary(out, plan, manifest, log, fp16_bytes, crops, stages.setup_rows(settings, pipe))
        stages.write_run_report(out, plan, stats, crops, {"skipped": list(log.skipped), **summary})
    except KeyboardInterrupt:
        fail(f"interrupted; finished stages stay cached in {out} and a rerun resumes from there", 130)
    except (stages.ExportError, CheckpointError, ManifestError, ValueError, OSError) as e:
        fail(first_line(e))
    for note in log.notes:
        click.echo(f"warning: {note}", err=True)
    # The paths are printed here only: the report itself names no folder (exports stay byte-identical).
    paths = {"manifest": str(out / MANIFEST_FILE), "report": str(out / "report" / "report.md")}
    click.echo("\n".join(_summary_lines({**summary, **stages.device_rows(settings, log), **paths}, log.skipped)))
