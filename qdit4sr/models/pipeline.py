"""Full-precision DiT4SR super-resolution: flow-matching Euler sampling, CFG, tiled denoising.

Every transformer call runs inside `step_scope(i)` (see step_context), and `step_callbacks` are called
with (step_index, timestep) before each step, so calibration and quantized layers know the timestep.

The initial noise comes from `qdit4sr.noise` (a portable generator, not torch.randn), and the bicubic
resizes and the colour-fix statistics are computed in float64: the C++ runtime (serving/cpp)
reproduces this sampler bit for bit on the exported graphs.

`tile_callbacks` are called with the number of tiles each transformer call has just denoised (for a
progress bar), and `upscale_work(shape)` says beforehand how many steps x tiles an upscale costs.

`upscale(image, prompt=...)` conditions one call on other prompt embeddings than the pipeline's own
(per-request captions); they are validated against the transformer, and against the fixed text length
of an exported transformer (one with a `text_tokens` attribute).

Importing this module loads torch but not diffusers: the sampler's schedule is `flow_match`, and the
transformer (diffusers' SD3 blocks) is imported only by `from_folder`, so running an exported folder
never loads diffusers.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..noise import gaussian_noise
from .flow_match import FlowMatchEulerSchedule
from .images import resize_bicubic, to_rgb8, to_tensor, to_uint8
from .latents import load_codec
from .placement import DeviceConfig, model_device, model_dtype, place
from .step_context import step_scope
from .tiling import gaussian_weights, tile_windows

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"


@dataclass(frozen=True)
class PipelineConfig:
    num_inference_steps: int = 40
    shift: float = 3.0
    guidance_scale: float = 8.0
    tile_size: int = 64          # latent pixels per tile side
    tile_overlap: int = 24       # latent pixels shared by neighbouring tiles
    tile_batch: int = 16         # tiles per transformer call
    min_lr_side: int = 128       # LR images are first enlarged so their short side reaches this
    color_fix: str = "adain"     # "adain" or "none"

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if self.color_fix not in ("adain", "none"):
            raise ValueError(f"color_fix must be 'adain' or 'none', got {self.color_fix!r}")
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError("need 0 <= tile_overlap < tile_size")

    @classmethod
    def from_json(cls, path: Path, **overrides) -> "PipelineConfig":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, **overrides})


PROMPT_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


class PromptError(ValueError):
    """Prompt embeddings that do not fit the transformer (or the exported graphs)."""


@dataclass
class PromptEmbeddings:
    """Precomputed text conditioning (the text encoders are not part of this tool).

    The file format is one safetensors file with the keys of PROMPT_KEYS (the negative pair optional),
    as SD3's `encode_prompt` returns them.
    """

    prompt_embeds: torch.Tensor                 # [1, S, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor          # [1, pooled_projection_dim]
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    @classmethod
    def null(cls, joint_dim: int, pooled_dim: int, tokens: int = 4) -> "PromptEmbeddings":
        return cls(torch.zeros(1, tokens, joint_dim), torch.zeros(1, pooled_dim))

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptEmbeddings":
        path = Path(path)
        if not path.is_file():
            raise PromptError(f"prompt embeddings file {path} does not exist")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise PromptError(f"{path.name} is not a readable safetensors file ({e})") from e
        unknown = sorted(set(t) - set(PROMPT_KEYS))
        missing = [k for k in PROMPT_KEYS[:2] if k not in t]
        if missing or unknown:
            raise PromptError(f"{path.name} must hold {', '.join(PROMPT_KEYS[:2])} (and optionally the negative "
                              f"pair); missing {missing}, unknown {unknown}")
        return cls(*(t.get(k) for k in PROMPT_KEYS))

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    @property
    def tokens(self) -> int:
        return int(self.prompt_embeds.shape[1])

    def validate(self, joint_dim: int, pooled_dim: int, tokens: int | None = None) -> "PromptEmbeddings":
        """Raise PromptError naming every shape that does not fit; returns self.

        `tokens`: the fixed text length of exported graphs (None: any length, the same for both prompts).
        """
        problems = []
        expect = {"prompt_embeds": (1, tokens or self.tokens, joint_dim), "pooled_prompt_embeds": (1, pooled_dim)}
        if (self.negative_prompt_embeds is None) != (self.negative_pooled_prompt_embeds is None):
            problems.append("negative_prompt_embeds and negative_pooled_prompt_embeds come together or not at all")
        elif self.has_negative:
            expect.update(negative_prompt_embeds=expect["prompt_embeds"],
                          negative_pooled_prompt_embeds=expect["pooled_prompt_embeds"])
        for key, shape in expect.items():
            t = getattr(self, key)
            if tuple(t.shape) != shape:
                problems.append(f"{key} has shape {list(t.shape)}, expected {list(shape)}")
            elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                problems.append(f"{key} must hold finite floats")
        if problems:
            fixed = f" (its exported graphs take {tokens} text tokens)" if tokens is not None else ""
            raise PromptError(f"prompt embeddings do not fit the transformer{fixed}: " + "; ".join(problems))
        return self

    def describe(self, guidance_scale: float) -> str:
        """One line for summaries: how many text tokens, and whether CFG is used."""
        if self.has_negative and guidance_scale > 1.0:
            cfg = f"CFG {guidance_scale:g} with the negative prompt"
        else:
            cfg = "no CFG" + (f" (guidance {guidance_scale:g})" if self.has_negative else " (no negative prompt)")
        return f"{self.tokens} text tokens, {cfg}"

    def to(self, device, dtype) -> "PromptEmbeddings":
        return PromptEmbeddings(*(None if t is None else t.to(device=device, dtype=dtype)
                                  for t in (getattr(self, k) for k in PROMPT_KEYS)))


@dataclass(frozen=True)
class UpscaleWork:
    """What one upscale costs, known before it runs."""

    input_size: tuple[int, int]      # (width, height) of the LR image
    output_size: tuple[int, int]     # (width, height) of the result
    latent_size: tuple[int, int]     # (width, height) of the denoised latent
    steps: int                       # sampler steps
    tiles: int                       # latent tiles per step (1 when the latent fits one tile)
    tile_size: int                   # latent pixels per tile side
    tile_batch: int                  # tiles per transformer call
    cfg: bool                        # classifier-free guidance doubles every call's batch

    @property
    def tile_passes(self) -> int:
        """Tiles denoised in all (what the progress bar counts)."""
        return self.steps * self.tiles

    @property
    def transformer_calls(self) -> int:
        return self.steps * math.ceil(self.tiles / self.tile_batch)


class DiT4SRPipeline:
    """The sampler around a transformer (torch module or exported stand-in) and a latent codec.

    The sampler state (noise, latents, velocities) is float32 on `device`; the transformer sees its
    inputs in `dtype`. Both follow the transformer unless given (`placed` sets them for a run).
    """

    def __init__(self, transformer, codec, config: PipelineConfig, prompt: PromptEmbeddings | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.transformer = transformer.eval()
        self.codec = codec
        self.config = config
        tc = transformer.config
        self.prompt = prompt or PromptEmbeddings.null(tc.joint_attention_dim, tc.pooled_projection_dim)
        self.prompt.validate(tc.joint_attention_dim, tc.pooled_projection_dim, getattr(transformer, "text_tokens", None))
        self.device = torch.device(device) if device is not None else model_device(transformer)
        self.dtype = dtype or model_dtype(transformer)
        self.step_callbacks: list[Callable[[int, float], None]] = []
        self.tile_callbacks: list[Callable[[int], None]] = []
        self._prompt_cache: tuple | None = None

    @contextlib.contextmanager
    def placed(self, placement: DeviceConfig) -> Iterator["DiT4SRPipeline"]:
        """Run on `placement`'s device and dtype (the transformer offloaded block by block if asked).

        Afterwards the model keeps the dtype; it stays on the device, or is back in host memory
        when offloaded.
        """
        with place(self.transformer, placement):
            self.device, self.dtype = placement.torch_device, placement.torch_dtype
            self.codec.to(self.device, self.dtype)
            try:
                yield self
            finally:
                if placement.offload:
                    self.device = torch.device("cpu")
                    self.codec.to(self.device, self.dtype)

    @classmethod
    def from_folder(cls, path: str | Path, *, transformer_overrides: dict | None = None,
                    dtype: torch.dtype | None = torch.float32, prompt: PromptEmbeddings | None = None,
                    **config_overrides) -> "DiT4SRPipeline":
        """The transformer (config entries overridden by `transformer_overrides`, e.g. the variant, so it is
        read once) in `dtype`, the codec, pipeline.json (else DiT4SR's defaults; `config_overrides` win)
        and the prompt: `prompt`, else the folder's prompt_embeds.safetensors, else the null prompt."""
        from .loading import load_transformer  # diffusers' blocks: loaded only when a torch model is

        folder = Path(path)
        transformer = load_transformer(folder, "transformer", dtype=dtype, **(transformer_overrides or {}))
        codec = load_codec(folder)
        cfg_file = folder / "pipeline.json"
        config = PipelineConfig.from_json(cfg_file, **config_overrides) if cfg_file.is_file() \
            else PipelineConfig(**config_overrides)
        prompt_file = folder / "prompt_embeds.safetensors"
        if prompt is None and prompt_file.is_file():
            prompt = PromptEmbeddings.from_file(prompt_file)
        return cls(transformer, codec, config, prompt)

    # -- sampling -----------------------------------------------------------------------------------
    def make_scheduler(self) -> FlowMatchEulerSchedule:
        """diffusers' FlowMatchEulerDiscreteScheduler(shift) after set_timesteps(steps), bit for bit."""
        return FlowMatchEulerSchedule(self.config.num_inference_steps, shift=self.config.shift)

    def sampler_timesteps(self) -> list[float]:
        return [float(t) for t in self.make_scheduler().timesteps]

    def check_prompt(self, prompt: PromptEmbeddings | None) -> PromptEmbeddings:
        """`prompt` (None: the pipeline's own) after checking it fits the transformer; PromptError if not."""
        if prompt is None:
            return self.prompt
        tc = self.transformer.config
        return prompt.validate(tc.joint_attention_dim, tc.pooled_projection_dim,
                               getattr(self.transformer, "text_tokens", None))

    def _use_cfg(self, prompt: PromptEmbeddings | None = None) -> bool:
        return self.config.guidance_scale > 1.0 and (prompt or self.prompt).has_negative

    def _prompt_on_device(self, prompt: PromptEmbeddings | None = None) -> PromptEmbeddings:
        """On the pipeline's device and dtype; the last one is cached (by identity, holding a reference,
        so a new prompt never takes a freed one's place)."""
        prompt = prompt or self.prompt
        key = (self.device, self.dtype)
        cache = self._prompt_cache
        if cache is None or cache[0] is not prompt or cache[1] != key:
            cache = self._prompt_cache = (prompt, key, prompt.to(self.device, self.dtype))
        return cache[2]

    def _velocity(self, x: torch.Tensor, lr: torch.Tensor, t: torch.Tensor,
                  prompt: PromptEmbeddings | None = None) -> torch.Tensor:
        """One batched transformer call on tiles x, lr [B, C, h, w], with CFG when configured.

        The transformer gets its inputs in the pipeline's dtype; the velocity comes back in x's dtype.
        """
        b = x.shape[0]
        p = self._prompt_on_device(prompt)
        out_dtype = x.dtype
        x, lr, t = x.to(self.dtype), lr.to(self.dtype), t.to(self.dtype)
        if self._use_cfg(p):
            text = torch.cat([p.negative_prompt_embeds.expand(b, -1, -1), p.prompt_embeds.expand(b, -1, -1)])
            pooled = torch.cat([p.negative_pooled_prompt_embeds.expand(b, -1), p.pooled_prompt_embeds.expand(b, -1)])
            v = self.transformer(torch.cat([x, x]), torch.cat([lr, lr]), text, pooled, t.expand(2 * b)).to(out_dtype)
            v_uncond, v_cond = v.chunk(2)
            return v_uncond + self.config.guidance_scale * (v_cond - v_uncond)
        return self.transformer(x, lr, p.prompt_embeds.expand(b, -1, -1), p.pooled_prompt_embeds.expand(b, -1),
                                t.expand(b)).to(out_dtype)

    def predict_velocity(self, x: torch.Tensor, lr: torch.Tensor, t: torch.Tensor, tiled: bool = True,
                         prompt: PromptEmbeddings | None = None) -> torch.Tensor:
        """Velocity for a full latent [1, C, H, W]: blended over overlapping tiles when it exceeds one tile."""
        h, w = x.shape[-2:]
        cfg = self.config
        if not tiled or (h <= cfg.tile_size and w <= cfg.tile_size):
            v = self._velocity(x, lr, t, prompt)
            self._tiles_done(1)
            return v
        windows = tile_windows(h, w, cfg.tile_size, cfg.tile_overlap)
        out = torch.zeros_like(x)
        norm = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
        for start in range(0, len(windows), cfg.tile_batch):
            chunk = windows[start:start + cfg.tile_batch]
            xs = torch.cat([x[..., r, c] for r, c in chunk])
            ls = torch.cat([lr[..., r, c] for r, c in chunk])
            vs = self._velocity(xs, ls, t, prompt).unflatten(0, (len(chunk), x.shape[0]))
            for (r, c), v in zip(chunk, vs):
                weight = gaussian_weights(v.shape[-2], v.shape[-1]).to(device=x.device, dtype=x.dtype)
                out[..., r, c] += v * weight
                norm[..., r, c] += weight
            self._tiles_done(len(chunk))
        return out / norm

    def _tiles_done(self, count: int) -> None:
        for callback in self.tile_callbacks:
            callback(count)

    @torch.no_grad()
    def denoise(self, lr_latent: torch.Tensor, seed: int = 0, tiled: bool = True,
                prompt: PromptEmbeddings | None = None) -> torch.Tensor:
        """Sample a latent from `seed`'s portable noise (see qdit4sr.noise) conditioned on lr_latent
        and `prompt` (None: the pipeline's own; checked with `check_prompt`).

        The noise is drawn on the CPU and moved to the pipeline's device, so a seed means the same
        sample on every device; the sampler state stays in lr_latent's dtype there.
        """
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int (the noise is qdit4sr.noise's, not a torch generator's), "
                            f"got {type(seed).__name__}")
        prompt = self.check_prompt(prompt)
        scheduler = self.make_scheduler()
        lr_latent = lr_latent.to(self.device)
        x = torch.from_numpy(gaussian_noise(tuple(lr_latent.shape), int(seed))).to(self.device, lr_latent.dtype)
        for i, t in enumerate(scheduler.timesteps):
            for callback in self.step_callbacks:
                callback(i, float(t))
            with step_scope(i):
                v = self.predict_velocity(x, lr_latent, t.reshape(1).to(x.device, x.dtype), tiled=tiled,
                                          prompt=prompt)
            x = scheduler.step(v, i, x)
        return x

    # -- images -------------------------------------------------------------------------------------
    def _alignment(self) -> int:
        return self.codec.downsample * self.transformer.config.patch_size

    def _geometry(self, h: int, w: int, scale: int) -> tuple[float, int, int, int, int]:
        """(enlargement, working output height and width, bottom and right padding) for an h x w input."""
        if min(h, w) < 8:
            raise ValueError(f"image {w}x{h} is too small; both sides must be at least 8 pixels")
        # Small inputs are enlarged first so the model sees at least its working resolution.
        enlarge = max(1.0, self.config.min_lr_side / min(h, w))
        out_h, out_w = round(h * enlarge) * scale, round(w * enlarge) * scale
        a = self._alignment()
        return enlarge, out_h, out_w, (-out_h) % a, (-out_w) % a

    def upscale_work(self, shape: tuple[int, ...], scale: int = 4,
                     prompt: PromptEmbeddings | None = None) -> UpscaleWork:
        """The cost of `upscale` on an image of `shape` ([H, W] or [H, W, C]) with `prompt`, without running it."""
        h, w = shape[:2]
        _, out_h, out_w, pad_h, pad_w = self._geometry(h, w, scale)
        latent_h, latent_w = (out_h + pad_h) // self.codec.downsample, (out_w + pad_w) // self.codec.downsample
        cfg = self.config
        fits = latent_h <= cfg.tile_size and latent_w <= cfg.tile_size
        tiles = 1 if fits else len(tile_windows(latent_h, latent_w, cfg.tile_size, cfg.tile_overlap))
        return UpscaleWork((w, h), (w * scale, h * scale), (latent_w, latent_h), cfg.num_inference_steps, tiles,
                           cfg.tile_size, 1 if fits else cfg.tile_batch, self._use_cfg(prompt))

    def upscale(self, image, scale: int = 4, seed: int = 0, prompt: PromptEmbeddings | None = None) -> np.ndarray:
        """RGB uint8 [H, W, 3] (or a PIL image) -> the x`scale` super-resolved uint8 image, conditioned on
        `prompt` (None: the pipeline's own prompt embeddings; PromptError before any work if it does not fit)."""
        prompt = self.check_prompt(prompt)
        lr = _as_rgb_uint8(image)
        h, w = lr.shape[:2]
        enlarge, out_h, out_w, pad_h, pad_w = self._geometry(h, w, scale)
        lr_t = to_tensor(lr)
        cond = resize_bicubic(lr_t, out_h, out_w)
        padded = torch.nn.functional.pad(cond, (0, pad_w, 0, pad_h), mode="replicate")
        lr_latent = self.codec.encode(padded.to(self.device))
        latent = self.denoise(lr_latent, seed, prompt=prompt)
        sr = self.codec.decode(latent).cpu()[..., :out_h, :out_w]
        if self.config.color_fix == "adain":
            sr = adain_color_fix(sr, cond)
        if enlarge > 1.0:
            sr = resize_bicubic(sr, h * scale, w * scale)
        return to_uint8(sr)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and std to the reference (removes colour drift of the sampler).

    The statistics are computed in float64 and rounded to the image dtype: a float32 sum's rounding
    depends on the summation order (torch's depends on the CPU's vector width and thread count),
    float64 makes them a property of the data that another runtime reproduces exactly.
    """

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t64 = t.double()
        return t64.mean((-2, -1), keepdim=True).to(t.dtype), t64.std((-2, -1), keepdim=True).to(t.dtype)

    mu_i, sd_i = stats(image)
    mu_r, sd_r = stats(reference)
    return ((image - mu_i) / (sd_i + eps) * sd_r + mu_r).clamp(0, 1)


def _as_rgb_uint8(image) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image or an array ([H, W], [H, W, 3] or RGBA [H, W, 4]); what
    `images.to_rgb8` changes on the way (transparency composited on white, 16 bits scaled to 8) is
    said with a warning."""
    array = np.asarray(image) if not hasattr(image, "convert") else None
    if array is not None and array.ndim == 3 and array.shape[2] == 4 and array.dtype == np.uint8:
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(array), "RGBA")
    if hasattr(image, "convert"):
        import warnings

        image, notes = to_rgb8(image)
        for note in notes:
            warnings.warn(note, stacklevel=3)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return np.ascontiguousarray(image)


def load_default_pipeline(**config_overrides) -> DiT4SRPipeline:
    """The embedded tiny DiT4SR shipped with the package (no downloads)."""
    return DiT4SRPipeline.from_folder(DEFAULT_MODEL_DIR, **config_overrides)
