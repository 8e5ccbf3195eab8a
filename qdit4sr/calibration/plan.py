"""The quantization config and the BitPlan artifact: a (layer x timestep) grid of weight and activation bits.

The plan also carries the segments (timestep ranges sharing one engine), the static activation
scales per (layer, segment), the 8-bit softmax-input scales per (attention core, segment) and every
hyper-parameter, as versioned JSON validated on load.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write_text

PLAN_VERSION = 2
_PRECISION = re.compile(r"^w(\d+(?:\.\d+)?)a(\d+(?:\.\d+)?)$")
DECOMPOSITIONS = ("rtn", "svd", "hsvd", "hsvd_split")
STORAGE_DTYPES = ("float16", "float32")
ERROR_COMPENSATIONS = ("none", "gptq", "gptq_act")


# The methods of the paper's ablation, full Q-DiT4SR first: the one table `--method` and
# `QDiT4SRConfig.preset` read.
METHOD_PRESETS: dict[str, dict] = {
    "qdit4sr": dict(decomposition="hsvd", mixed_weight_bits=True, temporal_act_bits=True),
    "hsvd_vasmp": dict(decomposition="hsvd", mixed_weight_bits=True, temporal_act_bits=False),
    "hsvd": dict(decomposition="hsvd", mixed_weight_bits=False, temporal_act_bits=False),
    "svdquant": dict(decomposition="svd", mixed_weight_bits=False, temporal_act_bits=False),
    "rtn": dict(decomposition="rtn", mixed_weight_bits=False, temporal_act_bits=False),
    # Beyond the paper: the H-SVD budget split by the quantized error, then GPTQ on the residue (in the full
    # new method also accounting for the layer's own input quantization noise).
    "hsvd_split": dict(decomposition="hsvd_split", mixed_weight_bits=False, temporal_act_bits=False),
    "hsvd_split_gptq": dict(decomposition="hsvd_split", error_compensation="gptq", mixed_weight_bits=False,
                            temporal_act_bits=False),
    "qdit4sr_plus": dict(decomposition="hsvd_split", error_compensation="gptq_act", mixed_weight_bits=True,
                         temporal_act_bits=True),
}


def step_to_segment(segments: Sequence[Sequence[int]]) -> list[int]:
    """Sampler step -> timestep segment, for contiguous [start, end) segments from step 0.

    The one place the map is computed: the plan, the quantized modules, the manifest and the runtime
    all take it from here.
    """
    return [k for k, (start, end) in enumerate(segments) for _ in range(start, end)]


def default_rank(width: int) -> int:
    """The paper's rank 32 at width 1536, scaled down for narrower models so branches stay small."""
    return max(4, round(32 * width / 1536))


@dataclass(frozen=True)
class QDiT4SRConfig:
    """What to quantize and how (torchao-style config). Presets mirror the paper's ablation rows."""

    weight_bits: float = 4.0          # VaSMP: weighted-mean budget; otherwise the uniform width
    act_bits: float = 4.0             # VaTMP: per-layer mean over steps; otherwise uniform; 16 = FP activations
    group_size: int | None = 64       # layers with <= 4 weight bits (INT4 blocks); None = per output channel
    wide_group_size: int | None = None  # layers with > 4 bits (INT8 container): TensorRT blocks only INT4
    decomposition: str = "hsvd"       # "rtn" (no branch), "svd" (global low rank), "hsvd" (global + block rank-1),
                                      # "hsvd_split" (H-SVD's FP budget split by the quantized error)
    rank: int = 32
    mixed_weight_bits: bool = True    # VaSMP
    temporal_act_bits: bool | None = None  # VaTMP; None = on when act_bits <= 4, as in the method
    num_segments: int = 4
    hadamard: bool = True
    weight_bit_range: tuple[int, int] = (2, 8)
    act_bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    scale_search: bool = False
    error_compensation: str = "none"  # "gptq": quantize residues column by column with the calibration Gram;
                                      # "gptq_act": also for the inputs' own quantization noise
    gptq_damp: float = 0.01           # GPTQ: damping as a fraction of the Gram's mean diagonal
    act_clip_search: bool = False     # static activation scales by MSE on calibration histograms, not Gaussian
    softmax_bits: int = 8             # softmax input; 16 = full precision (always so when act_bits is 16)
    storage_dtype: str = "float16"    # branches, scales, biases and unquantized weights as deployed
    seed: int = 0

    def __post_init__(self):
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {self.decomposition!r}")
        lo, hi = self.weight_bit_range
        if not 2 <= lo <= self.weight_bits <= hi <= 8:
            raise ValueError(f"weight bits {self.weight_bits} must lie in {self.weight_bit_range} within 2..8")
        if self.act_bits != 16 and not min(self.act_bit_choices) <= self.act_bits <= max(self.act_bit_choices):
            raise ValueError(f"activation bits {self.act_bits} must lie in {self.act_bit_choices} or be 16")
        if not self.mixed_weight_bits and self.weight_bits != int(self.weight_bits):
            raise ValueError("uniform weight bits must be an integer")
        if not self.use_temporal and self.act_bits != int(self.act_bits):
            raise ValueError("uniform activation bits must be an integer")
        if self.softmax_bits != 16 and not 2 <= self.softmax_bits <= 8:
            raise ValueError(f"softmax input bits must lie in 2..8 or be 16, got {self.softmax_bits}")
        if self.error_compensation not in ERROR_COMPENSATIONS:
            raise ValueError(f"error_compensation must be one of {ERROR_COMPENSATIONS}, "
                             f"got {self.error_compensation!r}")
        if not 0 < self.gptq_damp < 1:
            raise ValueError(f"gptq_damp must lie in (0, 1), got {self.gptq_damp!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.num_segments < 1 or self.rank < 0:
            raise ValueError("num_segments must be >= 1 and rank >= 0")

    @property
    def use_temporal(self) -> bool:
        if self.act_bits == 16:
            return False
        return self.act_bits <= 4 if self.temporal_act_bits is None else self.temporal_act_bits

    def group_size_for(self, weight_bits: int) -> int | None:
        return self.group_size if weight_bits <= 4 else self.wide_group_size

    @property
    def quantize_softmax(self) -> bool:
        return self.act_bits != 16 and self.softmax_bits != 16

    @classmethod
    def from_precision(cls, precision: str, **overrides) -> "QDiT4SRConfig":
        """'w4a4' -> weight budget 4, activation budget 4 (any of w2..w8, a2..a8 or a16)."""
        m = _PRECISION.match(precision.strip().lower())
        if not m:
            raise ValueError(f"precision {precision!r} is not of the form w<bits>a<bits>, e.g. w4a4, w4a6, w8a8")
        return cls(weight_bits=float(m.group(1)), act_bits=float(m.group(2)), **overrides)

    @classmethod
    def preset(cls, name: str, precision: str, **overrides) -> "QDiT4SRConfig":
        """One row of METHOD_PRESETS at a precision, e.g. preset("qdit4sr", "w4a4", rank=8)."""
        if name not in METHOD_PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(METHOD_PRESETS)}")
        return cls.from_precision(precision, **{**METHOD_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_bit_range"] = list(self.weight_bit_range)
        d["act_bit_choices"] = list(self.act_bit_choices)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QDiT4SRConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        d = dict(d)
        if "weight_bit_range" in d:
            d["weight_bit_range"] = tuple(d["weight_bit_range"])
        if "act_bit_choices" in d:
            d["act_bit_choices"] = tuple(d["act_bit_choices"])
        return cls(**d)


@dataclass(frozen=True)
class QuantizationSettings:
    """The user-level quantization choices (what `qdit4sr-export`'s quantization options set)."""

    precision: str = "w4a4"
    method: str = "qdit4sr"           # a row of METHOD_PRESETS
    segments: int = 4
    rank: int | None = None           # None: default_rank(model width)

    def for_width(self, width: int) -> "QuantizationSettings":
        """These settings with the rank chosen for a model of hidden size `width` when none was given."""
        return self if self.rank is not None else replace(self, rank=default_rank(width))

    def config(self, seed: int = 0) -> QDiT4SRConfig:
        if self.rank is None:
            raise ValueError("the rank is not chosen yet: call for_width(model width) first")
        return QDiT4SRConfig.preset(self.method, self.precision, num_segments=self.segments, rank=self.rank, seed=seed)


@dataclass
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    weight_bits: int
    weight_variance: float            # variance of the quantized residue (after rotation and branches)
    act_bits: list[int]               # one per segment
    act_scales: list[float]           # static Q/DQ scale per segment
    rank: int = 0
    block_shape: list[int] | None = None


def _upgrade_v1(raw: dict) -> dict:
    """Version 1 plans predate the 8-bit softmax, fp16 storage and per-channel INT8 layers: read them with
    the settings they were made with (FP softmax input, float32 storage, one group size for all layers)."""
    config = raw.get("config")
    if not isinstance(config, dict):
        return raw
    config = {"softmax_bits": 16, "storage_dtype": "float32", "wide_group_size": config.get("group_size", 64),
              **config}
    return {**raw, "version": PLAN_VERSION, "config": config, "softmax": []}


@dataclass
class SoftmaxPlan:
    name: str                         # the attention core (module name)
    bits: int
    scales: list[float]               # static softmax-input scale per segment


@dataclass
class BitPlan:
    config: QDiT4SRConfig
    timesteps: list[float]
    segments: list[tuple[int, int]]   # [start, end) sampler-step ranges, covering 0..T
    layers: list[LayerPlan]
    stats: dict = field(default_factory=dict)   # achieved budgets, modelled distortions, solver flags
    softmax: list[SoftmaxPlan] = field(default_factory=list)
    version: int = PLAN_VERSION

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def segment_of_step(self) -> list[int]:
        return step_to_segment(self.segments)

    def act_bits_grid(self) -> np.ndarray:
        """[L, T] activation bits of every layer at every sampler step."""
        seg = self.segment_of_step()
        return np.array([[layer.act_bits[s] for s in seg] for layer in self.layers], dtype=np.int64)

    def weight_bits(self) -> np.ndarray:
        return np.array([layer.weight_bits for layer in self.layers], dtype=np.int64)

    def mean_weight_bits(self) -> float:
        n = np.array([l.in_features * l.out_features for l in self.layers], dtype=np.float64)
        return float((n * self.weight_bits()).sum() / n.sum())

    def mean_act_bits(self) -> float:
        return float(self.act_bits_grid().mean())

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # -- serialisation -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": self.version, "config": self.config.to_dict(), "timesteps": self.timesteps,
                           "segments": [list(s) for s in self.segments], "stats": self.stats,
                           "layers": [asdict(l) for l in self.layers],
                           "softmax": [asdict(s) for s in self.softmax]}, indent=1)

    def save(self, path: Path) -> None:
        text = self.to_json()
        atomic_write_text(Path(path), text)

    @classmethod
    def from_json(cls, text: str) -> "BitPlan":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"bit plan is not valid JSON: {e}") from e
        if raw.get("version") == 1:
            raw = _upgrade_v1(raw)
        if raw.get("version") != PLAN_VERSION:
            raise ValueError(f"bit plan version {raw.get('version')!r} is not supported (expected {PLAN_VERSION})")
        try:
            plan = cls(config=QDiT4SRConfig.from_dict(raw["config"]), timesteps=[float(t) for t in raw["timesteps"]],
                       segments=[(int(a), int(b)) for a, b in raw["segments"]],
                       layers=[LayerPlan(**l) for l in raw["layers"]], stats=raw.get("stats", {}),
                       softmax=[SoftmaxPlan(**s) for s in raw["softmax"]])
        except (KeyError, TypeError) as e:
            raise ValueError(f"bit plan is missing or has malformed fields: {e}") from e
        plan.validate()
        return plan

    @classmethod
    def load(cls, path: Path) -> "BitPlan":
        return cls.from_json(Path(path).read_text())

    def validate(self) -> None:
        t = self.num_steps
        if not self.segments or self.segments[0][0] != 0 or self.segments[-1][1] != t:
            raise ValueError(f"segments {self.segments} must cover steps 0..{t}")
        for (a, b), (c, _) in zip(self.segments, self.segments[1:]):
            if not a < b == c:
                raise ValueError(f"segments {self.segments} must be contiguous and non-empty")
        k = len(self.segments)
        allowed_act = set(self.config.act_bit_choices) | {16}
        for layer in self.layers:
            if len(layer.act_bits) != k or len(layer.act_scales) != k:
                raise ValueError(f"layer {layer.name}: needs {k} activation bits and scales")
            if not 2 <= layer.weight_bits <= 8:
                raise ValueError(f"layer {layer.name}: weight bits {layer.weight_bits} outside 2..8")
            if any(b not in allowed_act for b in layer.act_bits):
                raise ValueError(f"layer {layer.name}: activation bits {layer.act_bits} not in {sorted(allowed_act)}")
            if any(not s > 0 for s in layer.act_scales):
                raise ValueError(f"layer {layer.name}: activation scales must be positive")
        for site in self.softmax:
            if not 2 <= site.bits <= 8:
                raise ValueError(f"softmax {site.name}: input bits {site.bits} outside 2..8")
            if len(site.scales) != k or any(not s > 0 for s in site.scales):
                raise ValueError(f"softmax {site.name}: needs {k} positive scales, got {site.scales}")
