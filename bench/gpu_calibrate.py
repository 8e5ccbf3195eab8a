#!/usr/bin/env python
"""Calibration + quantization of the full-width DiT4SR transformer (random weights) on one device, in one
dtype: stage times and peak device memory, as one table (with the Triton kernel rows of
bench_kernels_gpu.py's output when given).

    python bench/gpu_calibrate.py --device cuda --dtype bfloat16 --layers 8     # what bench/gpu_check.sh runs
    python bench/gpu_calibrate.py --device cpu --config tiny                    # the same code path, on a CPU

`--config full` is DiT4SR's width (1536, 24 heads, text 4096/2048, 333 text tokens, CFG 8 with a negative
pair) with `--layers` blocks (the first half dual-attention, as in the published model's first 13 of 24);
`--config tiny` the shipped tiny model's shape, random weights, for a quick check anywhere. The weights
are random normal(0, 0.02) (RMS-norm gains 1), created straight on the device in the dtype. The latent
codec is a fixed random projection of an x8 pixel-unshuffle to the transformer's channels: it stands in for
the SD3.5 VAE, whose cost is not what is measured here. Calibration runs the sampler (CFG doubles every
batch) over bundled-photo crops, one transformer tile each; quantization is the export's default method at
`--precision`, every layer decomposed and quantized on the device.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout as well

from qdit4sr.calibration.api import quantize_  # noqa: E402
from qdit4sr.calibration.layers import example_inputs, used_linears  # noqa: E402
from qdit4sr.calibration.plan import QuantizationSettings  # noqa: E402
from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats  # noqa: E402
from qdit4sr.models.config import DIT4SR_CONFIG, TINY_CONFIG  # noqa: E402
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig, PromptEmbeddings  # noqa: E402
from qdit4sr.models.placement import DTYPES, DeviceConfig, peak_device_bytes, reset_peak  # noqa: E402
from qdit4sr.models.transformer import DiT4SRTransformer2DModel  # noqa: E402

GIB = 2 ** 30
GAIN_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")


class ProjectionCodec:
    """latent = fixed random projection of pixel_unshuffle(2x - 1, 8): a weightless stand-in for the VAE."""

    kind = "projection"

    def __init__(self, channels: int, factor: int = 8, seed: int = 0):
        self.factor = factor
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3 * factor ** 2, 1, 1, generator=gen) / (3 * factor ** 2) ** 0.5

    @property
    def downsample(self) -> int:
        return self.factor

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(image * 2.0 - 1.0, self.factor)
        return F.conv2d(x, self.weight.to(x.device, x.dtype))

    def to(self, device=None, dtype=None) -> "ProjectionCodec":
        return self


def model_config(name: str, layers: int | None) -> dict:
    base = dict(DIT4SR_CONFIG if name == "full" else TINY_CONFIG)
    depth = layers or base["num_layers"]
    dual = min(len(base["dual_attention_layers"]), (depth + 1) // 2)
    return {**base, "num_layers": depth, "dual_attention_layers": list(range(dual))}


def random_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> DiT4SRTransformer2DModel:
    """Built on the meta device, then materialised on `device` in `dtype`: no float32 copy anywhere. The
    buffers (the sin-cos position table) come from a one-block CPU replica: to_empty leaves them unset."""
    with torch.device("meta"):
        model = DiT4SRTransformer2DModel(**config).to(dtype)
    model = model.to_empty(device=device)
    replica = DiT4SRTransformer2DModel(**{**config, "num_layers": 1, "dual_attention_layers": []})
    with torch.no_grad():
        for name, buffer in replica.named_buffers():
            model.get_buffer(name).copy_(buffer)
    del replica
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(GAIN_SUFFIXES):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def layer_names(config: dict) -> list[str]:
    """The linears a forward uses, traced on a narrow CPU replica with the same block structure."""
    narrow = {**config, "num_attention_heads": 1, "attention_head_dim": 8, "caption_projection_dim": 8,
              "joint_attention_dim": 8, "pooled_projection_dim": 8, "pos_embed_max_size": 8}
    model = DiT4SRTransformer2DModel(**narrow)
    return list(used_linears(model, example_inputs(model)))


def random_prompt(config: dict, tokens: int, seed: int) -> PromptEmbeddings:
    gen = torch.Generator().manual_seed(seed)
    text, pooled = (1, tokens, config["joint_attention_dim"]), (1, config["pooled_projection_dim"])
    return PromptEmbeddings(*(torch.randn(shape, generator=gen) for shape in (text, pooled, text, pooled)))


def kernel_rows(log: Path) -> list[tuple[str, str, str]]:
    """(item, value, note) rows from bench_kernels_gpu.py's printed table."""
    rows = []
    pattern = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(W4A\d+(?: int only)?)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+"
                         r"([\d.]+)\s+([\d.]+)\s+(\S+)\s*$")
    for line in log.read_text().splitlines():
        m = pattern.match(line)
        if m:
            mm, k, n, name, tile, fused, fp16, ratio, tops, err = m.groups()
            rows.append((f"kernel {name} M={mm} {k}x{n}", f"{float(fused):.3f} ms",
                         f"fp16 nn.Linear {float(fp16):.3f} ms, ratio {ratio}, rel err {err}"))
    if not rows:
        rows.append(("kernels", "no rows", f"see {log.name}"))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print(f"{row[0]:<{width[0]}}  {row[1]:>{width[1]}}  {row[2]}")
        if i == 0:
            print("-" * (sum(width) + 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--offload", action="store_true", help="keep the model in host memory, one block on the device")
    parser.add_argument("--config", choices=["full", "tiny"], default="full")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks [default: the config's]")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per calibration crop")
    parser.add_argument("--crops", type=int, default=2, help="calibration crops (denoised as one batch)")
    parser.add_argument("--tokens", type=int, default=None, help="text tokens [default: 333 full, 8 tiny]")
    parser.add_argument("--precision", default="w4a4")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels-log", type=Path, default=None, help="bench_kernels_gpu.py output to add")
    args = parser.parse_args()

    try:
        placement = DeviceConfig(args.device, args.dtype, args.offload)
        placement.check_available()
    except ValueError as e:
        sys.exit(f"gpu_calibrate: {e}")
    device, dtype = placement.torch_device, placement.torch_dtype
    config = model_config(args.config, args.layers)
    tokens = args.tokens or (333 if args.config == "full" else 8)
    tile = 64 if args.config == "full" else 16
    timings: dict[str, float] = {}
    peaks: dict[str, int | None] = {}

    def stage(name: str, fn):
        reset_peak(placement)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = time.perf_counter() - start
        peaks[name] = peak_device_bytes(placement)
        return result

    home = torch.device("cpu") if args.offload else device
    model = stage("build", lambda: random_model(config, home, dtype, args.seed))
    params = sum(p.numel() for p in model.parameters())
    names = layer_names(config)
    layers = {n: model.get_submodule(n) for n in names}
    pipe_config = PipelineConfig(num_inference_steps=args.steps, shift=3.0, guidance_scale=8.0, tile_size=tile,
                                 tile_overlap=tile // 4, tile_batch=16, min_lr_side=8)
    codec = ProjectionCodec(config["in_channels"], 8 if args.config == "full" else 2, args.seed)
    pipe = DiT4SRPipeline(model, codec, pipe_config, random_prompt(config, tokens, args.seed))
    quant = QuantizationSettings(precision=args.precision, segments=args.segments).for_width(
        config["num_attention_heads"] * config["attention_head_dim"]).config(seed=args.seed)
    calib = CalibrationConfig(num_images=args.crops, lr_crop=tile * codec.downsample // 4, seed=args.seed,
                              batch_size=args.crops, gram=quant.error_compensation != "none",
                              act_hist=quant.act_clip_search)

    def calibrate():
        with pipe.placed(placement):
            return collect_activation_stats(pipe, layers, calib, progress=False)

    stats = stage("calibration", calibrate)
    plan = stage("quantization", lambda: quantize_(model, quant, stats, progress=False, device=device))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [("item", "value", "note"),
            ("device", f"{gpu}", f"torch {torch.__version__}, model {args.dtype}"
                                 f"{', offload' if args.offload else ''}"),
            ("model", f"{params / 1e9:.3f} B params",
             f"{args.config} width {config['num_attention_heads'] * config['attention_head_dim']}, "
             f"{config['num_layers']} blocks ({len(config['dual_attention_layers'])} dual), random weights"),
            ("calibration work", f"{args.crops} crops x {args.steps} steps",
             f"latent tile {tile}, {tokens} text tokens, CFG (2x batch), {len(names)} layers recorded")]
    for name in ("build", "calibration", "quantization"):
        peak = peaks[name]
        rows.append((f"{name} time", f"{timings[name]:.1f} s",
                     "peak device memory " + (f"{peak / GIB:.2f} GiB" if peak is not None else "n/a (cpu)")))
    rows.append(("quantized", f"{len(plan.layers)} layers",
                 f"{args.precision} {quant.decomposition} rank {quant.rank}, {len(plan.segments)} segments, mean "
                 f"weight bits {plan.mean_weight_bits():.2f}, mean act bits {plan.mean_act_bits():.2f}"))
    if args.kernels_log is not None:
        rows += kernel_rows(args.kernels_log)
    print_table(rows)


if __name__ == "__main__":
    main()
