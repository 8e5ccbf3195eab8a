"""`qdit4sr-triton-repo ENGINES_DIR --out MODEL_REPO`: a Triton model repository from an exported folder."""
from __future__ import annotations

from pathlib import Path

import click

from ..serving.triton_repo import FILE_MODES, SEGMENT_FORMS, RepositorySettings
from .common import CONTEXT_SETTINGS, fail, first_line
from .options import GroupedCommand, OptionGroup

SEGMENT_OPTIONS = OptionGroup("Segment models", (
    click.Option(["--segment-form"], type=click.Choice(SEGMENT_FORMS), default=RepositorySettings.segment_form,
                 show_default=True, help="Python backend running onnxruntime, Triton's onnxruntime backend on the "
                                         "portable graphs, or the TensorRT engines."),
    click.Option(["--max-batch-size"], type=click.IntRange(1), default=None,
                 help="Tiles per segment batch [default: the most one sampler call sends]. With tensorrt_plan it "
                      "must not exceed the engines' profile maximum (--batch-max of the engine build)."),
    click.Option(["--max-queue-delay-us"], type=click.IntRange(0), default=RepositorySettings.max_queue_delay_us,
                 show_default=True, help="How long the dynamic batcher waits for tiles of other requests."),
    click.Option(["--segment-instances"], type=click.IntRange(1), default=RepositorySettings.segment_instances,
                 show_default=True, help="Instances per segment model (per GPU with --kind gpu)."),
    click.Option(["--kind", "instance_kind"], type=click.Choice(["cpu", "gpu"]), default=None,
                 help="Segment instance kind [default: gpu for tensorrt_plan, cpu otherwise]."),
    click.Option(["--intra-op-threads"], type=click.IntRange(0), default=RepositorySettings.intra_op_threads,
                 show_default=True, help="onnxruntime threads per segment instance (0: onnxruntime's choice)."),
), dict)

SAMPLER_OPTIONS = OptionGroup("Sampler model (qdit4sr_upscale)", (
    click.Option(["--upscale-instances"], type=click.IntRange(1), default=RepositorySettings.upscale_instances,
                 show_default=True, help="Requests the sampler model works on at once."),
    click.Option(["--torch-threads"], type=click.IntRange(0), default=RepositorySettings.torch_threads,
                 show_default=True, help="torch threads per sampler instance (0: torch's choice)."),
), dict)

REPOSITORY_OPTIONS = OptionGroup("Repository", (
    click.Option(["--prefix"], default=RepositorySettings.prefix, show_default=True,
                 help="Model name prefix (<prefix>_upscale, <prefix>_segment_kk)."),
    click.Option(["--files"], type=click.Choice(FILE_MODES), default=RepositorySettings.files, show_default=True,
                 help="How graphs, weights and engines enter the repository; copy keeps it relocatable."),
    click.Option(["--python-path"], default=None,
                 help="Folder holding the qdit4sr package on the server, written into model.py (the Python backend "
                      "ignores PYTHONPATH) [default: this installation's; '' when qdit4sr is installed on the "
                      "server]."),
), dict)


@click.command(cls=GroupedCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("engines_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Model repository folder to write (tritonserver --model-repository).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@SEGMENT_OPTIONS
@SAMPLER_OPTIONS
@REPOSITORY_OPTIONS
def triton_repo_command(engines_dir: Path, out: Path, force: bool, **options):
    """Write a Triton Inference Server model repository for the exported folder ENGINES_DIR."""
    from ..artifacts.manifest import ManifestError
    from ..serving.triton_repo import RepositoryError, write_model_repository

    if not engines_dir.is_dir():
        fail(f"{engines_dir} is not a folder")
    try:
        settings = RepositorySettings(**SEGMENT_OPTIONS.build(options), **SAMPLER_OPTIONS.build(options),
                                      **REPOSITORY_OPTIONS.build(options))
        repo = write_model_repository(engines_dir, out, settings, force=force)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except (ManifestError, RepositoryError, ValueError, OSError) as e:
        fail(first_line(e))
    click.echo(f"wrote {repo.root}: {repo.upscale_model} (BLS sampler) + {len(repo.segment_models)} "
               f"{settings.segment_form} segment models, max_batch_size {repo.max_batch_size}")
    click.echo(f"serve:  tritonserver --model-repository {repo.root}")


if __name__ == "__main__":  # python -m qdit4sr.cli.triton_repo ENGINES_DIR --out MODEL_REPO
    triton_repo_command()
