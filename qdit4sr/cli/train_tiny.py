"""`python -m qdit4sr.cli.train_tiny --out qdit4sr/models/default`: retrain the embedded tiny DiT4SR."""
from __future__ import annotations

from pathlib import Path

import click

from ..models.train_tiny import TrainConfig, train
from .common import CONTEXT_SETTINGS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (transformer/, codec.json, pipeline.json, training.json).")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True)
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True)
@click.option("--sampler-steps", type=int, default=TrainConfig.sampler_steps, show_default=True)
@click.option("--shift", type=float, default=TrainConfig.shift, show_default=True)
@click.option("--x0-loss/--v-loss", default=TrainConfig.x0_loss, show_default=True)
@click.option("--warmup", type=int, default=TrainConfig.warmup, show_default=True)
@click.option("--ema-decay", type=float, default=TrainConfig.ema_decay, show_default=True)
@click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start from this model folder's weights instead of a random init.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--threads", type=int, default=TrainConfig.threads, show_default=True)
def main(out: Path, steps: int, batch_size: int, lr: float, sampler_steps: int, shift: float, x0_loss: bool,
         warmup: int, ema_decay: float, init: Path | None, seed: int, threads: int) -> None:
    """Train the embedded tiny DiT4SR on the bundled photos (seeded, CPU)."""
    train(TrainConfig(steps=steps, batch_size=batch_size, lr=lr, sampler_steps=sampler_steps, shift=shift,
                      x0_loss=x0_loss, warmup=warmup, ema_decay=ema_decay, seed=seed, threads=threads), out,
          init=init)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
