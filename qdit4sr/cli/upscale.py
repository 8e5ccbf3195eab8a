"""`qdit4sr-upscale`: super-resolve an image x4 with a folder written by qdit4sr-export."""
from __future__ import annotations

from pathlib import Path

import click

from ..artifacts.flavour import Flavour
from .common import CONTEXT_SETTINGS, fail, first_line


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
def upscale_command(image, engines, output, flavour, seed):
    """Super-resolve IMAGE x4 with an exported folder."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..artifacts.manifest import ManifestError
    from ..engines.runtime import load_exported_pipeline
    from ..fileio import atomic_write

    if not image.is_file():
        fail(f"image {image} does not exist")
    try:
        with Image.open(image) as im:
            if im.mode not in ("RGB", "RGBA", "L"):
                fail(f"image mode {im.mode} is not supported; use RGB or greyscale")
            lr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        fail(f"{image} is not a readable image ({e})")
    try:
        pipe = load_exported_pipeline(engines, flavour=flavour)
        sr = pipe.upscale(lr, seed=seed)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, lambda tmp: Image.fromarray(sr).save(tmp, format="PNG"))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except (ManifestError, ValueError, OSError, RuntimeError) as e:
        fail(first_line(e))
    click.echo(f"wrote {output} ({sr.shape[1]}x{sr.shape[0]})")
