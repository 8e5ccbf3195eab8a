"""Command-line tools of the engines package.

    qdit4sr-profile ENGINES_DIR [--run] [--iterations N] [--batch B]
        prints (and with --run executes) one trtexec profiling command per segment engine. A folder
        with graphs but no engines (what qdit4sr-export writes without TensorRT) gets the commands
        that build them instead, under a note saying so, and exit code 0. Exit codes: 0 printed / all
        runs passed, 1 some trtexec run failed, 2 nothing usable (missing folder or manifest, neither
        engines nor trt graphs, --run without engines or without trtexec on PATH): the reason is one
        line on stderr.

    qdit4sr-build-engines FOLDER [options]
        builds the segment engines (needs TensorRT, triton and a CUDA device; exit code 2 and the
        reason otherwise).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..engines.build import EngineBuildConfig
from ..engines.profile import DEFAULT_ITERATIONS
from .common import CONTEXT_SETTINGS
from .options import ENGINE_BUILD_OPTIONS, GroupedCommand


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(2)


@click.command("qdit4sr-profile", context_settings=CONTEXT_SETTINGS)
@click.argument("engines_dir", type=click.Path(path_type=Path))
@click.option("--run", "run_", is_flag=True, help="Execute the trtexec commands (trtexec must be on PATH).")
@click.option("--iterations", type=click.IntRange(min=1), default=DEFAULT_ITERATIONS, show_default=True,
              help="trtexec --iterations.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help=f"Batch size of the profiled shapes [default: {EngineBuildConfig().batch_opt}, the profile's opt].")
@click.pass_context
def profile_command(ctx: click.Context, engines_dir: Path, run_: bool, iterations: int, batch: int | None) -> None:
    """Print trtexec commands that profile each segment engine of ENGINES_DIR (an exported folder)."""
    from ..engines.profile import ProfileError, plan_profile, run_plan

    try:
        plan = plan_profile(engines_dir, batch=batch, iterations=iterations)
    except ProfileError as e:
        _fail(ctx, str(e))
        return
    for line in plan.lines():
        click.echo(line)
    if plan.kind == "graphs":
        # No engines yet: the lines printed are the build commands, which is the answer, not an error,
        # unless --run asked to profile something.
        if run_:
            _fail(ctx, f"no TensorRT engines in {engines_dir} to run; build them with the commands above")
        return
    if run_:
        try:
            failed = run_plan(plan, echo=click.echo)
        except ProfileError as e:
            _fail(ctx, str(e))
            return
        if failed:
            click.echo(f"error: {failed} of {len(plan.commands)} trtexec run(s) failed", err=True)
            ctx.exit(1)


@click.command("qdit4sr-build-engines", cls=GroupedCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--verbose", is_flag=True, help="TensorRT's verbose builder log.")
@ENGINE_BUILD_OPTIONS
@click.pass_context
def build_engines_command(ctx: click.Context, folder: Path, verbose: bool, **options) -> None:
    """Build one TensorRT engine per timestep segment of the exported FOLDER."""
    from ..artifacts.manifest import ManifestError
    from ..engines.build import TensorRTUnavailable, build_engines

    try:
        paths = build_engines(folder, ENGINE_BUILD_OPTIONS.build(options), verbose=verbose)
    except (TensorRTUnavailable, ManifestError, ValueError) as e:
        _fail(ctx, f"engines were not built: {e}")
        return
    for path in paths:
        click.echo(str(path))
