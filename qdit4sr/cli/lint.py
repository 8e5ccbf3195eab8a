"""`qdit4sr-lint-trt`: check an exported ONNX graph against TensorRT's rules without building it."""
from __future__ import annotations

from pathlib import Path

import click

from .common import CONTEXT_SETTINGS


@click.command(name="lint-trt", context_settings=CONTEXT_SETTINGS,
               help="Check an exported ONNX model against TensorRT's rules without building it.")
@click.argument("model", type=click.Path(path_type=Path))
@click.pass_context
def lint_trt_command(ctx: click.Context, model: Path) -> None:
    from ..exporter.trt_lint import ModelLoadError, format_violations, lint_model

    try:
        violations = lint_model(model)
    except ModelLoadError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    if violations:
        click.echo(format_violations(violations))
        click.echo(f"{len(violations)} TensorRT lint violation(s) in {model}")
        ctx.exit(1)
    click.echo(f"no TensorRT lint violations in {model}")
