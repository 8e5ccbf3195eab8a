"""Activation statistics per quantized layer and sampler step, collected once over a calibration set.

For every layer the hook records, at each step, the second moment v = mean(x_H^2) of the
Hadamard-rotated input (the quantity VaTMP schedules on) and its absolute maximum. For every attention
core it records the absolute maximum of the scaled logits, the range of the 8-bit softmax input.
With `CalibrationConfig(gram=True)` it also accumulates each layer's input Gram matrix x_H^T x_H / N over
all steps and tokens, which the GPTQ-style error compensation of the residue quantization needs. The sums
run in float64; the mean Grams are kept and stored in float32 (10.9 GiB for the full-size model instead of
21.8; the rounding moves GPTQ's output error by about 1e-5 relative), and a loaded artifact reads each
layer's Gram from disk only when it is asked for, so `quantize_` holds one at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from ..fileio import atomic_write, atomic_write_text
from ..models.images import TRAIN_PHOTOS, degrade_x4, fit_short_side, load_photo, resize_bicubic, to_tensor
from ..models.step_context import current_step
from .actclip import HIST_BINS, abs_histogram
from .hadamard import apply_hadamard
from .qsoftmax import LogitRecorder, attention_cores

STATS_VERSION = 2
_GRAM_PREFIX = "gram."


class LazyGrams(Mapping):
    """layer -> Gram matrix [in, in], read from the statistics file on each access (nothing is cached).

    Refuses to read once the file has been replaced or changed since it was opened, rather than mixing
    two calibrations.
    """

    def __init__(self, path: Path, names: list[str]):
        self.path, self._names = Path(path), list(names)
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if self._file_stamp() != self._stamp:
            raise RuntimeError(f"{self.path} changed after the activation statistics were loaded; load them again")
        with safe_open(str(self.path), framework="numpy") as f:
            return f.get_tensor(_GRAM_PREFIX + name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True)
class CalibrationConfig:
    num_images: int = 32
    lr_crop: int | None = None    # LR crop side; None = one transformer tile after x4 upscaling
    scale: int = 4
    seed: int = 0
    hadamard: bool = True
    batch_size: int = 16          # crops denoised together (statistics pool over the batch anyway)
    gram: bool = False            # also record each layer's input Gram matrix (in^2 values per layer)
    act_hist: bool = False        # also record per-step histograms of |x_H| (for the activation clip search)


@dataclass
class ActivationStats:
    layers: list[str]
    timesteps: list[float]
    second_moment: np.ndarray   # [L, T] mean of squared (rotated) inputs
    amax: np.ndarray            # [L, T]
    config: CalibrationConfig
    softmax_sites: list[str] = field(default_factory=list)   # attention cores, by module name
    softmax_amax: np.ndarray | None = None                    # [S, T] max |q k^T / sqrt(d)|
    gram: Mapping[str, np.ndarray] | None = None              # layer -> [in, in] mean of x_H x_H^T per token
    act_hist: np.ndarray | None = None                        # [L, T, actclip.HIST_BINS] counts of |x_H|

    def __post_init__(self):
        if self.softmax_amax is None:
            self.softmax_amax = np.zeros((len(self.softmax_sites), len(self.timesteps)))
        expected = (len(self.softmax_sites), len(self.timesteps))
        if self.softmax_amax.shape != expected:
            raise ValueError(f"softmax statistics have shape {self.softmax_amax.shape}, expected {expected}")

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"second_moment": self.second_moment.astype(np.float64), "amax": self.amax.astype(np.float64),
                  "softmax_amax": self.softmax_amax.astype(np.float64)}
        # float32 on disk (half the size); the sums behind them were float64.
        arrays.update({_GRAM_PREFIX + name: np.asarray(g, dtype=np.float32) for name, g in (self.gram or {}).items()})
        if self.act_hist is not None:
            arrays["act_hist"] = self.act_hist.astype(np.float64)
        atomic_write(folder / "activation_stats.safetensors", lambda tmp: save_file(arrays, tmp))
        meta = {"version": STATS_VERSION, "layers": self.layers, "timesteps": self.timesteps,
                "softmax_sites": self.softmax_sites, "config": asdict(self.config)}
        atomic_write_text(folder / "activation_stats.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "ActivationStats":
        folder = Path(folder)
        meta = json.loads((folder / "activation_stats.json").read_text())
        if meta.get("version") != STATS_VERSION:
            raise ValueError(f"activation statistics version {meta.get('version')} is not {STATS_VERSION}")
        path = folder / "activation_stats.safetensors"
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            arrays = {k: f.get_tensor(k) for k in keys if not k.startswith(_GRAM_PREFIX)}
        # The Grams (in^2 values per layer) stay on disk until asked for.
        gram_names = [k[len(_GRAM_PREFIX):] for k in keys if k.startswith(_GRAM_PREFIX)]
        stats = cls(meta["layers"], meta["timesteps"], arrays["second_moment"], arrays["amax"],
                    CalibrationConfig(**meta["config"]), meta["softmax_sites"], arrays["softmax_amax"],
                    LazyGrams(path, gram_names) if gram_names else None, arrays.get("act_hist"))
        expected = (len(stats.layers), len(stats.timesteps))
        if stats.second_moment.shape != expected or stats.amax.shape != expected:
            raise ValueError(f"activation statistics arrays do not match {expected}")
        return stats

    def with_logit_range(self, sites: list[str], amax: float) -> "ActivationStats":
        """A copy where every given attention core has logit range `amax` at every step (synthetic statistics)."""
        return dataclasses.replace(self, softmax_sites=list(sites),
                                   softmax_amax=np.full((len(sites), len(self.timesteps)), float(amax)))

    def layer_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.layers)}


ROW_CHUNK_ELEMENTS = 2**24  # rows of a layer input rotated at once (128 MB in float64)


def _rotated_chunks(x: torch.Tensor, hadamard: bool):
    """Rows of x [.., K] as [n, K] chunks, widened and Hadamard-rotated, on x's device, whatever x's dtype.

    float64 on the CPU (as before: as cheap as float32 there), float32 on accelerators (where float64
    is slow). In chunks, so the widened copy of a large bf16 activation never exists whole.
    """
    compute = torch.float64 if x.device.type == "cpu" else torch.float32
    rows = x.detach().reshape(-1, x.shape[-1])
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(compute)
        yield apply_hadamard(chunk) if hadamard else chunk


def _moments(x: torch.Tensor, hadamard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squares as float64, amax) of the rotated x, on x's device."""
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    amax = torch.zeros((), dtype=torch.float64, device=x.device)
    for chunk in _rotated_chunks(x, hadamard):
        sq += chunk.square().sum(dtype=torch.float64)
        amax = torch.maximum(amax, chunk.abs().amax().double())
    return sq, amax


class _Recorder:
    """Forward pre-hooks accumulating sum(x^2), count and amax per (layer, step), optionally histograms
    and Gram matrices.

    Sums, maxima and Grams stay on the compute device (float64) until the end: no device sync per call.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], steps: int, hadamard: bool, gram: bool = False,
                 act_hist: bool = False, device: torch.device | str = "cpu"):
        self.names = list(layers)
        self.sq = torch.zeros((len(layers), steps), dtype=torch.float64, device=device)
        self.amax = torch.zeros((len(layers), steps), dtype=torch.float64, device=device)
        self.count = np.zeros((len(layers), steps))
        self.hadamard = hadamard
        self.gram = [None] * len(layers) if gram else None
        self.hist = np.zeros((len(layers), steps, HIST_BINS)) if act_hist else None
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(layers.values())]

    def _hook(self, index: int):
        def hook(module, args):
            step = current_step()
            if step is None:
                return
            x = args[0]
            for chunk in _rotated_chunks(x, self.hadamard):
                self.sq[index, step] += chunk.square().sum(dtype=torch.float64).to(self.sq.device)
                self.amax[index, step] = torch.maximum(self.amax[index, step],
                                                       chunk.abs().amax().to(self.amax.device, torch.float64))
                if self.hist is not None:
                    self.hist[index, step] += abs_histogram(chunk)
                if self.gram is not None:
                    g = (chunk.mT @ chunk).double()
                    self.gram[index] = g if self.gram[index] is None else self.gram[index] + g
            self.count[index, step] += x.numel()
        return hook

    def mean_grams(self) -> dict[str, np.ndarray] | None:
        """Per-layer Gram matrices divided by the number of tokens seen (over all steps), as float32 (what the
        artifact stores, so quantizing from memory or from disk gives the same result)."""
        if self.gram is None:
            return None
        tokens = {i: self.count[i].sum() / g.shape[0] for i, g in enumerate(self.gram)}
        return {name: (self.gram[i] / tokens[i]).to(torch.float32).cpu().numpy() for i, name in enumerate(self.names)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _LogitRanges:
    """Puts a LogitRecorder into every attention core (explicit attention) and records max |logit| per step."""

    def __init__(self, cores: dict, steps: int, device: torch.device | str = "cpu"):
        self.names = list(cores)
        self.amax = torch.zeros((len(cores), steps), dtype=torch.float64, device=device)
        self.seen = np.zeros((len(cores), steps), dtype=bool)
        self._cores = cores
        self._before = {name: core.softmax for name, core in cores.items()}
        for i, core in enumerate(cores.values()):
            core.softmax = LogitRecorder(self._record(i))

    def _record(self, index: int):
        def record(logits: torch.Tensor) -> None:
            step = current_step()
            if step is None:
                return
            amax = logits.detach().abs().amax().to(self.amax.device, torch.float64)
            self.amax[index, step] = torch.maximum(self.amax[index, step], amax)
            self.seen[index, step] = True
        return record

    def remove(self) -> None:
        for name, core in self._cores.items():
            core.softmax = self._before[name]


def calibration_images(config: CalibrationConfig, lr_crop: int) -> list[torch.Tensor]:
    """Deterministic LR crops (x4-degraded) from the training photos; held-out photos stay unseen.

    Photos smaller than the HR crop are enlarged to fit it (with a message), so any crop size works.
    """
    rng = np.random.default_rng(config.seed)
    hr_size = lr_crop * config.scale
    photos = []
    for name in TRAIN_PHOTOS:
        photo, enlarged = fit_short_side(to_tensor(load_photo(name)), hr_size)
        if enlarged:
            tqdm.write(f"calibration: photo {name} is smaller than the {hr_size}x{hr_size} crop; enlarged to "
                       f"{photo.shape[-1]}x{photo.shape[-2]}", file=sys.stderr)
        photos.append(photo)
    crops = []
    for _ in range(config.num_images):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[-2:]
        top, left = int(rng.integers(0, h - hr_size + 1)), int(rng.integers(0, w - hr_size + 1))
        crops.append(degrade_x4(photo[..., top:top + hr_size, left:left + hr_size], config.scale))
    return crops


@torch.no_grad()
def collect_activation_stats(pipeline, layers: dict[str, torch.nn.Module], config: CalibrationConfig = CalibrationConfig(),
                             progress: bool = True, images: list[torch.Tensor] | None = None) -> ActivationStats:
    """Run the sampler on the calibration crops and record per-step statistics of every layer's input.

    `images` (LR crops [1, 3, h, w] of one size) replace the bundled-photo crops when given.
    """
    tile_px = pipeline.config.tile_size * pipeline.codec.downsample
    lr_crop = config.lr_crop or tile_px // config.scale
    timesteps = pipeline.sampler_timesteps()
    device = pipeline.device
    recorder = _Recorder(layers, len(timesteps), config.hadamard, config.gram, config.act_hist, device)
    logits = _LogitRanges(attention_cores(pipeline.transformer), len(timesteps), device)
    try:
        if images is None:
            images = calibration_images(config, lr_crop)
        if not images or len({tuple(im.shape) for im in images}) != 1:
            raise ValueError("calibration needs at least one image, all crops of the same size")
        batches = [torch.cat(images[i:i + config.batch_size]) for i in range(0, len(images), config.batch_size)]
        for i, lr in enumerate(tqdm(batches, desc="calibration", disable=not progress)):
            cond = resize_bicubic(lr, lr.shape[-2] * config.scale, lr.shape[-1] * config.scale)
            latent = pipeline.codec.encode(cond.to(device))
            pipeline.denoise(latent, config.seed * 100003 + i)
    finally:
        recorder.remove()
        logits.remove()
    if (recorder.count == 0).any():
        missing = sorted({recorder.names[i] for i in np.nonzero((recorder.count == 0).any(1))[0]})
        raise RuntimeError(f"no activations recorded for {len(missing)} layers, e.g. {missing[:3]}")
    if not logits.seen.all():
        missing = sorted({logits.names[i] for i in np.nonzero(~logits.seen.all(1))[0]})
        raise RuntimeError(f"no attention logits recorded for {len(missing)} attention cores, e.g. {missing[:3]}")
    return ActivationStats(recorder.names, timesteps, recorder.sq.cpu().numpy() / recorder.count,
                           recorder.amax.cpu().numpy(), config, logits.names, logits.amax.cpu().numpy(),
                           recorder.mean_grams(), recorder.hist)
