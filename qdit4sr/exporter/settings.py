"""The settings of one export run, one dataclass per concern; the command line builds each from one
option group (`qdit4sr.cli.options`).

    ExportSettings(model=ModelSettings(path=...), quantization=QuantizationSettings("w4a4"),
                   calibration=CalibrationSettings(count=32), export=ExportConfig(flavours=("portable",)),
                   engines=EngineBuildConfig(batch_max=8), seed=0)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..artifacts.flavour import DEFAULT_EXPORT_FLAVOURS, ENGINE_FLAVOUR, Flavour
from ..calibration.plan import QDiT4SRConfig, QuantizationSettings
from ..checks import check_int
from ..engines.build import EngineBuildConfig


@dataclass(frozen=True)
class ModelSettings:
    path: str | None = None           # DiT4SR folder; None: the embedded tiny model
    variant: str | None = None        # overrides the checkpoint variant recorded in its config


@dataclass(frozen=True)
class CalibrationSettings:
    images: str | None = None         # folder of LR calibration images; None: crops of the bundled photos
    count: int = 32

    def __post_init__(self):
        check_int("calibration count", self.count)


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
    export: ExportConfig = field(default_factory=ExportConfig)
    engines: EngineBuildConfig = field(default_factory=EngineBuildConfig)
    seed: int = 0

    def for_width(self, width: int) -> "ExportSettings":
        """These settings with the rank chosen for the loaded model's width when none was given."""
        return replace(self, quantization=self.quantization.for_width(width))

    def quant_config(self) -> QDiT4SRConfig:
        return self.quantization.config(seed=self.seed)

    def cached_record(self) -> dict:
        """What decides the cached stages (calibration, quantization, graphs). The engines are rebuilt
        on every run, so their settings may change without invalidating the cache."""
        record = asdict(self)
        del record["engines"]
        return record
