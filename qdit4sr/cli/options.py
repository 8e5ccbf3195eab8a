"""Option groups: each builds one settings dataclass, the way Polygraphy's argument groups do.

    @click.command(cls=GroupedCommand)
    @ENGINE_BUILD_OPTIONS
    def command(**values):
        config = ENGINE_BUILD_OPTIONS.build(values)    # pops its own options from `values`

`--help` lists each group's options under the group's title.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from ..artifacts.flavour import DEFAULT_EXPORT_FLAVOURS, ENGINE_FLAVOUR, Flavour
from ..calibration.plan import METHOD_PRESETS, QDiT4SRConfig, QuantizationSettings
from ..engines.build import EngineBuildConfig


@dataclass(frozen=True)
class OptionGroup:
    title: str
    options: tuple[click.Option, ...]
    make: Callable[..., Any]          # the settings dataclass (or a function) taking the options' values

    def __call__(self, command: Callable) -> Callable:
        for option in reversed(self.options):
            option.group_title = self.title  # read by GroupedCommand.format_options
            command.__dict__.setdefault("__click_params__", []).append(option)  # what @click.option does
        return command

    def build(self, values: dict[str, Any]) -> Any:
        """The settings from the command's keyword arguments; removes this group's entries."""
        return self.make(**{option.name: values.pop(option.name) for option in self.options})


class GroupedCommand(click.Command):
    """A command whose --help shows the options of each OptionGroup under its title."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group_title", "Options"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def _check_precision(ctx, param, value: str) -> str:
    try:
        QDiT4SRConfig.from_precision(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return value.lower()


def _check_device(ctx, param, value: str) -> str:
    """cpu, cuda or cuda:N, by name only: whether this machine has that device is checked before loading."""
    name = value.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise click.BadParameter(f"{value!r} is not cpu, cuda or cuda:N")
    return name


def _check_finite(ctx, param, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _model(model: Path | None, variant: str | None, prompt_embeds: Path | None):
    from ..exporter.settings import ModelSettings

    return ModelSettings(path=None if model is None else str(model), variant=variant,
                         prompt_embeds=None if prompt_embeds is None else str(prompt_embeds))


def _calibration(calib_images: Path | None, calib_count: int, calib_size: int | None):
    from ..exporter.settings import CalibrationSettings

    return CalibrationSettings(images=None if calib_images is None else str(calib_images), count=calib_count,
                               size=calib_size)


def _sampler(steps: int | None, guidance: float | None, shift: float | None):
    from ..exporter.settings import SamplerSettings

    return SamplerSettings(steps=steps, guidance=guidance, shift=shift)


def _device(device: str, dtype: str, offload: bool):
    from ..models.placement import DeviceConfig

    try:
        return DeviceConfig(device=device, dtype=dtype, offload=offload)
    except ValueError as e:   # e.g. --offload with the cpu
        raise click.UsageError(str(e)) from e


def _export(flavours: tuple[str, ...]):
    from ..exporter.settings import ExportConfig

    return ExportConfig(flavours=Flavour.parse_many(flavours))


def _engine_build(workspace_gib: float, batch_min: int, batch_opt: int, batch_max: int, opt_level: int,
                  timing_cache: Path | None) -> EngineBuildConfig:
    return EngineBuildConfig(workspace_bytes=int(workspace_gib * (1 << 30)), batch_min=batch_min, batch_opt=batch_opt,
                             batch_max=batch_max, builder_optimization_level=opt_level,
                             timing_cache_path=None if timing_cache is None else str(timing_cache))


MODEL_OPTIONS = OptionGroup("Model", (
    click.Option(["--model"], type=click.Path(path_type=Path), default=None,
                 help="DiT4SR folder (transformer/ plus vae/ or codec.json); default: the embedded tiny model."),
    click.Option(["--variant"], type=click.Choice(["dit4sr_q", "dit4sr_r1"]), default=None,
                 help="Override the checkpoint variant recorded in its config."),
    click.Option(["--prompt-embeds"], type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="safetensors file of the text conditioning (prompt_embeds, pooled_prompt_embeds and, for "
                      "CFG, negative_prompt_embeds, negative_pooled_prompt_embeds, as SD3's encode_prompt returns "
                      "them); used in calibration and written into the export [default: the model folder's "
                      "prompt_embeds.safetensors, else a null prompt]."),
), _model)

SAMPLER_OPTIONS = OptionGroup("Sampler (calibration and the exported runtime)", (
    click.Option(["--steps"], type=click.IntRange(1, 1000), default=None,
                 help="Sampler steps [default: the model folder's pipeline.json, else 40]."),
    click.Option(["--guidance"], type=click.FloatRange(min=0), default=None, callback=_check_finite,
                 help="CFG scale, used when > 1 and the prompt embeddings have a negative pair [default: "
                      "pipeline.json, else 8]."),
    click.Option(["--shift"], type=click.FloatRange(min=0, min_open=True), default=None, callback=_check_finite,
                 help="Flow-matching timestep shift [default: pipeline.json, else 3]."),
), _sampler)

DEVICE_OPTIONS = OptionGroup("Device (calibration and quantization)", (
    click.Option(["--device"], default="cpu", show_default=True, callback=_check_device,
                 help="cpu, cuda or cuda:N."),
    click.Option(["--dtype"], type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                 show_default=True,
                 help="The model's dtype while calibrating, read straight into it (the statistics stay float32; "
                      "the graphs are exported from float32 whatever this is)."),
    click.Option(["--offload"], is_flag=True,
                 help="Keep the model in host memory and move one transformer block at a time to the device "
                      "(for a model larger than the GPU; needs --device cuda)."),
), _device)

QUANTIZATION_OPTIONS = OptionGroup("Quantization", (
    click.Option(["--precision"], default=QuantizationSettings.precision, show_default=True, callback=_check_precision,
                 help="Weight and activation bit budget, w<bits>a<bits> (e.g. w4a4, w4a6, w8a8; a16 keeps "
                      "activations FP)."),
    click.Option(["--method"], type=click.Choice(list(METHOD_PRESETS)), default=QuantizationSettings.method,
                 show_default=True, help="Full Q-DiT4SR or one of the ablation baselines."),
    click.Option(["--segments"], type=click.IntRange(1, 64), default=QuantizationSettings.segments, show_default=True,
                 help="Timestep segments (one graph / engine each) shared by all layers."),
    click.Option(["--rank"], type=click.IntRange(0, 1024), default=None,
                 help="Global low-rank branch rank [default: 32 at DiT4SR's width 1536, scaled with the model "
                      "width]."),
), QuantizationSettings)

CALIBRATION_OPTIONS = OptionGroup("Calibration", (
    click.Option(["--calib-images"], type=click.Path(path_type=Path), default=None,
                 help="Folder of LR calibration images; default: crops of the bundled photos."),
    click.Option(["--calib-count"], type=click.IntRange(1, 4096), default=32, show_default=True),
    click.Option(["--calib-size"], type=click.IntRange(1, 4096), default=None,
                 help="Side of the LR calibration crops in pixels [default: one transformer tile after the x4 "
                      "upscale, e.g. 128 for DiT4SR's 64-latent tiles and x8 VAE]."),
), _calibration)

EXPORT_OPTIONS = OptionGroup("Export", (
    click.Option(["--flavour", "flavours"], type=click.Choice(Flavour.names()), multiple=True,
                 default=[f.value for f in DEFAULT_EXPORT_FLAVOURS], show_default=True,
                 help=f"Graph flavour to write (repeat for several); with {ENGINE_FLAVOUR} also the TensorRT "
                      f"engines where TensorRT and a GPU exist."),
), _export)

ENGINE_BUILD_OPTIONS = OptionGroup("TensorRT engine build", (
    click.Option(["--workspace-gib"], type=click.FloatRange(min=0, min_open=True),
                 default=EngineBuildConfig.workspace_bytes / (1 << 30), show_default=True),
    click.Option(["--batch-min"], type=click.IntRange(min=1), default=EngineBuildConfig.batch_min, show_default=True),
    click.Option(["--batch-opt"], type=click.IntRange(min=1), default=EngineBuildConfig.batch_opt, show_default=True),
    click.Option(["--batch-max"], type=click.IntRange(min=1), default=EngineBuildConfig.batch_max, show_default=True),
    click.Option(["--opt-level"], type=click.IntRange(0, 5), default=EngineBuildConfig.builder_optimization_level,
                 show_default=True, help="TensorRT builder optimisation level."),
    click.Option(["--timing-cache"], type=click.Path(path_type=Path), default=None,
                 help="Timing cache file shared by the segments [default: FOLDER/timing.cache]."),
), _engine_build)
