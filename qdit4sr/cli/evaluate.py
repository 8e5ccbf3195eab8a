"""`python -m qdit4sr.cli.evaluate`: PSNR/SSIM of a DiT4SR folder against bicubic x4 on the held-out photos."""
from __future__ import annotations

from pathlib import Path

import click

from .common import CONTEXT_SETTINGS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the embedded tiny model")
@click.option("--crop", type=int, default=128, show_default=True, help="HR centre-crop size of each photo.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Override the number of sampler steps.")
@click.option("--shift", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Override the sampler's timestep shift.")
@click.option("--tile-overlap", type=click.IntRange(0, 1024), default=None,
              help="Override the tile overlap (latent pixels).")
def main(model: Path | None, crop: int, seed: int, steps: int | None, shift: float | None,
         tile_overlap: int | None) -> None:
    """Print the PSNR / SSIM table of the model and of bicubic x4."""
    from ..models.evaluate import evaluate, format_table, held_out_set
    from ..models.pipeline import DEFAULT_MODEL_DIR, DiT4SRPipeline

    overrides = {key: value for key, value in
                 (("num_inference_steps", steps), ("shift", shift), ("tile_overlap", tile_overlap)) if value is not None}
    pipe = DiT4SRPipeline.from_folder(model or DEFAULT_MODEL_DIR, **overrides)
    click.echo(format_table(evaluate(pipe, held_out_set(crop), seed)))


if __name__ == "__main__":
    main()
