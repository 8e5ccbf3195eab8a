"""The settings of one export run, one dataclass per concern; the command line builds each from one
option group (`qdit4sr.cli.options`).

    ExportSettings(model=ModelSettings(path=..., prompt_embeds="prompt.safetensors"),
                   quantization=QuantizationSettings("w4a4"), calibration=CalibrationSettings(count=32),
                   sampler=SamplerSettings(steps=40), device=DeviceConfig("cuda", "bfloat16"),
                   export=ExportConfig(flavours=("portable",)), engines=EngineBuildConfig(batch_max=8), seed=0)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..artifacts.flavour import DEFAULT_EXPORT_FLAVOURS, ENGINE_FLAVOUR, Flavour
from ..calibration.plan import QDiT4SRConfig, QuantizationSettings
from ..checks import check_int
from ..engines.build import EngineBuildConfig
from ..models.placement import DeviceConfig


@dataclass(frozen=True)
class ModelSettings:
    path: str | None = None           # DiT4SR folder; None: the embedded tiny model
    variant: str | None = None        # overrides the checkpoint variant recorded in its config
    prompt_embeds: str | None = None  # PromptEmbeddings file; None: the folder's prompt_embeds.safetensors, else null
    prompt_sha256: str | None = None  # of that file once read: the cache follows its content, not its name


@dataclass(frozen=True)
class SamplerSettings:
    """Overrides of the model folder's sampler (pipeline.json, else DiT4SR's 40 steps, CFG 8, shift 3);
    None keeps the folder's value. `resolved` fills in what the loaded pipeline uses."""

    steps: int | None = None
    guidance: float | None = None     # CFG scale; CFG runs when > 1 and the prompt has a negative pair
    shift: float | None = None        # flow-matching timestep shift

    def __post_init__(self):
        check_int("sampler steps", self.steps, optional=True)
        for name, value, low in (("guidance", self.guidance, 0.0), ("shift", self.shift, None)):
            if value is not None and not (math.isfinite(value) and (value >= low if low is not None else value > 0)):
                raise ValueError(f"sampler {name} must be a finite number {'>= 0' if low is not None else '> 0'}, "
                                 f"got {value}")

    def overrides(self) -> dict:
        """The PipelineConfig fields these settings replace."""
        pairs = (("num_inference_steps", self.steps), ("guidance_scale", self.guidance), ("shift", self.shift))
        return {name: value for name, value in pairs if value is not None}


@dataclass(frozen=True)
class CalibrationSettings:
    images: str | None = None         # folder of LR calibration images; None: crops of the bundled photos
    count: int = 32
    size: int | None = None           # LR crop side in pixels; None: one transformer tile after the x4 upscale

    def __post_init__(self):
        check_int("calibration count", self.count)
        check_int("calibration crop size", self.size, optional=True)


@dataclass(frozen=True)
class ExportConfig:
    flavours: tuple[Flavour, ...] = DEFAULT_EXPORT_FLAVOURS

    def __post_init__(self):
        object.__setattr__(self, "flavours", Flavour.parse_many(self.flavours))

    @property
    def builds_engines(self) -> bool:
        return ENGINE_FLAVOUR in self.flavours


@dataclass(frozen=True)
class ExportSettings:
    model: ModelSettings = field(default_factory=ModelSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    device: DeviceConfig = field(default_factory=DeviceConfig)   # where and in which dtype calibration runs
    export: ExportConfig = field(default_factory=ExportConfig)
    engines: EngineBuildConfig = field(default_factory=EngineBuildConfig)
    seed: int = 0

    def for_width(self, width: int) -> "ExportSettings":
        """These settings with the rank chosen for the loaded model's width when none was given."""
        return replace(self, quantization=self.quantization.for_width(width))

    def resolved(self, pipeline_config, calib_size: int, prompt_sha256: str | None) -> "ExportSettings":
        """These settings with the values the loaded pipeline uses filled in (sampler, crop size, prompt
        digest), so that the cached record says what was run, whatever came from defaults."""
        c = pipeline_config
        return replace(self, sampler=SamplerSettings(c.num_inference_steps, c.guidance_scale, c.shift),
                       calibration=replace(self.calibration, size=calib_size),
                       model=replace(self.model, prompt_sha256=prompt_sha256))

    def quant_config(self) -> QDiT4SRConfig:
        return self.quantization.config(seed=self.seed)

    def cached_record(self) -> dict:
        """What decides the cached stages (calibration, quantization, graphs). The engines are rebuilt
        on every run, so their settings may change without invalidating the cache; so may the device and
        offloading (the same statistics up to float rounding: a run interrupted on the GPU resumes on the
        CPU), and the prompt file's name (its digest is recorded). The model dtype does decide."""
        record = asdict(self)
        del record["engines"]
        record["device"] = {"dtype": self.device.dtype}
        del record["model"]["prompt_embeds"]
        return record
