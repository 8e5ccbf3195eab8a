"""`qdit4sr-triton-repo ENGINES_DIR --out MODEL_REPO`: a Triton model repository from an exported folder."""
from __future__ import annotations

from pathlib import Path

import click

from .common import CONTEXT_SETTINGS, fail, first_line

# The choices, spelled here so `--help` does not import the library (see cli/__init__.py).
SEGMENT_FORMS = ("python", "onnxruntime", "tensorrt_plan")
FILE_MODES = ("copy", "hardlink", "symlink")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("engines_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Model repository folder to write (tritonserver --model-repository).")
@click.option("--segment-form", type=click.Choice(SEGMENT_FORMS), default="python", show_default=True,
              help="Segment models: Python backend running onnxruntime, Triton's onnxruntime backend on the portable "
                   "graphs, or the TensorRT engines.")
@click.option("--prefix", default="qdit4sr", show_default=True, help="Model name prefix (<prefix>_upscale, ...).")
@click.option("--max-batch-size", type=click.IntRange(1), default=None,
              help="Tiles per segment batch [default: the most one sampler call sends]. With tensorrt_plan it must "
                   "not exceed the engines' profile maximum.")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="How long the dynamic batcher waits for tiles of other requests.")
@click.option("--segment-instances", type=click.IntRange(1), default=1, show_default=True,
              help="Instances per segment model (per GPU with --kind gpu).")
@click.option("--upscale-instances", type=click.IntRange(1), default=2, show_default=True,
              help="Requests the sampler model works on at once.")
@click.option("--kind", "instance_kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Segment instance kind [default: gpu for tensorrt_plan, cpu otherwise].")
@click.option("--intra-op-threads", type=click.IntRange(0), default=0, show_default=True,
              help="onnxruntime threads per segment instance (0: onnxruntime's choice).")
@click.option("--torch-threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch threads per sampler instance (0: torch's choice).")
@click.option("--files", type=click.Choice(FILE_MODES), default="copy", show_default=True,
              help="How graphs, weights and engines enter the repository; copy keeps it relocatable.")
@click.option("--python-path", default=None,
              help="Folder holding the qdit4sr package on the server, written into model.py (the Python backend "
                   "ignores PYTHONPATH) [default: this installation's; '' when qdit4sr is installed on the server].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def triton_repo_command(engines_dir, out, segment_form, prefix, max_batch_size, max_queue_delay_us, segment_instances,
                        upscale_instances, instance_kind, intra_op_threads, torch_threads, files, python_path, force):
    """Write a Triton Inference Server model repository for the exported folder ENGINES_DIR."""
    from ..artifacts.manifest import ManifestError
    from ..serving.triton_repo import RepositoryError, RepositorySettings, write_model_repository

    if not engines_dir.is_dir():
        fail(f"{engines_dir} is not a folder")
    try:
        settings = RepositorySettings(segment_form=segment_form, prefix=prefix, max_batch_size=max_batch_size,
                                      max_queue_delay_us=max_queue_delay_us, segment_instances=segment_instances,
                                      upscale_instances=upscale_instances, instance_kind=instance_kind,
                                      intra_op_threads=intra_op_threads, torch_threads=torch_threads, files=files,
                                      python_path=python_path)
        repo = write_model_repository(engines_dir, out, settings, force=force)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except (ManifestError, RepositoryError, ValueError, OSError) as e:
        fail(first_line(e))
    click.echo(f"wrote {repo.root}: {repo.upscale_model} (BLS sampler) + {len(repo.segment_models)} "
               f"{segment_form} segment models, max_batch_size {repo.max_batch_size}")
    click.echo(f"serve:  tritonserver --model-repository {repo.root}")


if __name__ == "__main__":  # python -m qdit4sr.cli.triton_repo ENGINES_DIR --out MODEL_REPO
    triton_repo_command()
