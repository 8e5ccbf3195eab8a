"""`qdit4sr-upscale`: super-resolve an image x4 with a folder written by qdit4sr-export.

Before any denoising it reads the image (transparency composited on white, 16-bit greyscale scaled to
8 bits, each said on stderr), checks that the output can be written, loads the folder (only the chosen
flavour's files need to be there) and prints what the run will cost: sampler steps x latent tiles. A
progress bar over those tiles goes to stderr (--no-progress turns it off), and after the first step an
estimate of the time left.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

from ..artifacts.flavour import Flavour
from .common import CONTEXT_SETTINGS, fail, first_line


def check_writable(output: Path) -> None:
    """Fail (one line naming `output`) unless a file can be created where `output` goes."""
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{output.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror or e}")


class _Progress:
    """The tile progress bar, and after the first sampler step an estimate of the time left."""

    def __init__(self, work, enabled: bool):
        from tqdm import tqdm

        self.work = work
        self.bar = tqdm(total=work.tile_passes, unit="tile", desc="denoising", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.started = time.perf_counter()

    def on_tiles(self, count: int) -> None:
        self.bar.update(count)

    def on_step(self, index: int, timestep: float) -> None:
        if index == 0:
            self.started = time.perf_counter()
        elif index == 1:
            first = time.perf_counter() - self.started
            left = self.work.steps - 1
            self.bar.write(f"first step took {first:.1f} s; about {first * left:.0f} s more for the other {left} "
                           f"step(s)", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--engines", "engines", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder written by qdit4sr-export.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--flavour", type=click.Choice(Flavour.names()), default=None,
              help="cpu: onnxruntime on the integer cpu graphs; portable: onnxruntime on the portable graphs; trt: "
                   "the TensorRT engines. [default: trt where the folder has engines and TensorRT runs here, else "
                   "cpu when the folder has it, else portable]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompt-embeds", "prompt_embeds", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Prompt embeddings for this image (a safetensors file as for qdit4sr-export --prompt-embeds, "
                   "e.g. of its caption) [default: the folder's, from the export].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar over the denoised tiles on stderr.")
def upscale_command(image, engines, output, flavour, seed, prompt_embeds, progress):
    """Super-resolve IMAGE x4 with an exported folder."""
    from ..artifacts.manifest import ManifestError
    from ..engines.runtime import load_exported_pipeline
    from ..fileio import atomic_write
    from ..models.images import read_image_rgb8
    from ..models.pipeline import PromptEmbeddings, PromptError

    if not image.is_file():
        fail(f"image {image} does not exist")
    try:
        lr, notes = read_image_rgb8(image)
    except ValueError as e:
        fail(first_line(e))
    for note in notes:
        click.echo(f"warning: {image}: {note}", err=True)
    check_writable(output)
    prompt = None
    if prompt_embeds is not None:
        try:
            prompt = PromptEmbeddings.from_file(prompt_embeds)
        except PromptError as e:
            fail(f"--prompt-embeds: {first_line(e)}")
    try:
        pipe = load_exported_pipeline(engines, flavour=flavour)
        if prompt is not None:
            try:
                pipe.check_prompt(prompt)
            except PromptError as e:
                fail(f"--prompt-embeds {prompt_embeds.name}: {first_line(e)}")
        work = pipe.upscale_work(lr.shape, prompt=prompt)
        flavour = pipe.transformer.runner.flavour   # the default, resolved from the folder and this machine
    except (ManifestError, ValueError, OSError, RuntimeError) as e:
        fail(first_line(e))
    click.echo(f"{image.name}: {work.input_size[0]}x{work.input_size[1]} -> {work.output_size[0]}x"
               f"{work.output_size[1]}: {work.steps} sampler steps x {work.tiles} latent tile(s) of {work.tile_size}x"
               f"{work.tile_size} = {work.tile_passes} tile passes in {work.transformer_calls} {flavour} transformer "
               f"call(s){' with guidance (2x batch)' if work.cfg else ''}", err=True)
    source = prompt_embeds.name if prompt is not None else "the export's prompt embeddings"
    click.echo(f"conditioning: {source}, {pipe.check_prompt(prompt).describe(pipe.config.guidance_scale)}", err=True)
    bar = _Progress(work, progress)
    pipe.tile_callbacks.append(bar.on_tiles)
    pipe.step_callbacks.append(bar.on_step)
    try:
        sr = pipe.upscale(lr, seed=seed, prompt=prompt)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except (ManifestError, ValueError, OSError, RuntimeError) as e:
        fail(first_line(e))
    finally:
        bar.close()
    try:
        from PIL import Image

        atomic_write(output, lambda tmp: Image.fromarray(sr).save(tmp, format="PNG"))
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror or e}")
    click.echo(f"wrote {output} ({sr.shape[1]}x{sr.shape[0]})")
