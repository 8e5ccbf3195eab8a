"""`python -m qdit4sr.cli.train_tiny --out qdit4sr/models/default`: retrain the embedded tiny DiT4SR."""
from __future__ import annotations

from pathlib import Path

import click

from ..models.train_tiny import TrainConfig, train
from .common import CONTEXT_SETTINGS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (transformer/, codec.json, training.json).")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True)
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--threads", type=int, default=TrainConfig.threads, show_default=True)
def main(out: Path, steps: int, batch_size: int, seed: int, threads: int) -> None:
    """Train the embedded tiny DiT4SR on the bundled photos (seeded, CPU)."""
    train(TrainConfig(steps=steps, batch_size=batch_size, seed=seed, threads=threads), out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
