#!/usr/bin/env python
"""Time the fused Triton quantized linear against torch fp16 nn.Linear (cuBLAS) on a CUDA GPU.

For every DiT4SR projection shape (K x N in 1536x1536, 1536x6144, 6144x1536) and token count
(2048, 4096) it times the fused kernel as W4A4 and W4A8 with a rank-32 low-rank branch and a
block rank-1 branch (plus W4A4 without branches, to show what the branches cost), takes the
median over CUDA-event timed runs, and prints the ratio to fp16 nn.Linear (> 1: slower).
The fused kernel reads float32 activations and quantizes them in-kernel, as the deployed layer
does; fp16 nn.Linear reads fp16 activations.  Each fused row also reports its relative error
against the float64 reference on the first 64 tokens.

    python bench/bench_kernels_gpu.py [--runs 50] [--tokens 2048 4096] [--precision tf32x3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

SHAPES = ((1536, 1536), (1536, 6144), (6144, 1536))  # (K, N)
# name -> (w_bits, a_bits, with branches)
CONFIGS = {"W4A4": (4, 4, True), "W4A8": (4, 8, True), "W4A4 int only": (4, 4, False)}
# Tile choices tried per shape; the fastest is reported.
TILES = (dict(block_m=64, block_n=128, num_warps=4), dict(block_m=128, block_n=128, num_warps=8),
         dict(block_m=64, block_n=64, num_warps=4))
CHECK_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="token counts M")
    parser.add_argument("--rank", type=int, default=32, help="low-rank branch rank R")
    parser.add_argument("--block", type=int, nargs=2, default=[32, 64], metavar=("S_O", "S_I"),
                        help="block rank-1 block shape")
    parser.add_argument("--group", type=int, default=64, help="weight scale group size")
    parser.add_argument("--precision", default="tf32x3", choices=["tf32x3", "tf32", "ieee"],
                        help="tl.dot precision of the float32 branches")
    return parser.parse_args()


def require_cuda() -> None:
    """Exit with a clear message where the benchmark cannot run."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_kernels_gpu.py: TRITON_INTERPRET is set; unset it to run the kernels on the GPU.")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu.py: no CUDA device found; this benchmark needs an NVIDIA GPU.")


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of fn on the current stream, in milliseconds, from CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_layer(k: int, n: int, w_bits: int, a_bits: int, branches: bool, args: argparse.Namespace,
               gen: torch.Generator) -> dict:
    """Keyword arguments of fused_quant_linear for a random layer on the GPU."""
    from qdit4sr.plugins.kernels import pack_weight

    q = 2 ** (w_bits - 1) - 1
    codes = torch.randint(-q, q + 1, (n, k), generator=gen)
    layer = dict(packed_w=pack_weight(codes, w_bits), w_scales=torch.rand(n, k // args.group, generator=gen) * 0.02,
                 w_bits=w_bits, group_size=args.group, a_scale=3.0 / (2 ** (a_bits - 1) - 1), a_bits=a_bits,
                 bias=torch.randn(n, generator=gen))
    if branches:
        s_o, s_i = args.block
        p, qb = n // s_o, k // s_i
        layer.update(down=torch.randn(args.rank, k, generator=gen) / k**0.5,
                     up=torch.randn(n, args.rank, generator=gen) / args.rank**0.5,
                     sigma=torch.rand(p, qb, generator=gen), u=torch.randn(p, qb, s_o, generator=gen) / s_o**0.5,
                     v=torch.randn(p, qb, s_i, generator=gen) / s_i**0.5)
    return {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in layer.items()}


def relative_error(layer: dict, x: torch.Tensor, precision: str) -> float:
    """max |fused - reference| / max |reference| on the first CHECK_TOKENS tokens."""
    from qdit4sr.plugins.kernels import fused_quant_linear, fused_quant_linear_reference

    xs = x[:CHECK_TOKENS]
    ref = fused_quant_linear_reference(xs, **layer)
    y = fused_quant_linear(xs, **layer, precision=precision)
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def best_fused_ms(layer: dict, x: torch.Tensor, args: argparse.Namespace) -> tuple[float, str]:
    """Fastest tile configuration for this layer: (median ms, description)."""
    from qdit4sr.plugins.kernels import fused_quant_linear

    results = []
    for tile in TILES:
        ms = median_ms(lambda: fused_quant_linear(x, **layer, precision=args.precision, **tile), args.runs,
                       args.warmup)
        results.append((ms, f"{tile['block_m']}x{tile['block_n']}/w{tile['num_warps']}"))
    return min(results)


def fp16_linear_ms(k: int, n: int, m: int, args: argparse.Namespace) -> float:
    linear = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.float16)
    x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        return median_ms(lambda: linear(x16), args.runs, args.warmup)


def main() -> None:
    args = parse_args()
    require_cuda()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    import triton

    gen = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"branches: rank {args.rank}, blocks {args.block[0]}x{args.block[1]}, group {args.group}, "
          f"precision {args.precision}, median of {args.runs} runs")
    header = f"{'M':>5} {'K':>5} {'N':>5}  {'config':<14} {'tile':<12} {'fused ms':>9} {'fp16 ms':>8} " \
             f"{'ratio':>6} {'TOPS':>6} {'rel err':>8}"
    print(header)
    print("-" * len(header))
    layers = {(k, n, name): make_layer(k, n, *cfg, args, gen) for k, n in SHAPES for name, cfg in CONFIGS.items()}
    for m in args.tokens:
        for k, n in SHAPES:
            t16 = fp16_linear_ms(k, n, m, args)
            x = torch.randn(m, k, generator=gen).cuda()
            for name in CONFIGS:
                layer = layers[(k, n, name)]
                ms, tile = best_fused_ms(layer, x, args)
                err = relative_error(layer, x, args.precision)
                tops = 2.0 * m * n * k / (ms * 1e-3) / 1e12
                print(f"{m:>5} {k:>5} {n:>5}  {name:<14} {tile:<12} {ms:>9.3f} {t16:>8.3f} {ms / t16:>6.2f} "
                      f"{tops:>6.1f} {err:>8.1e}")
    print("ratio = fused / fp16 nn.Linear time (> 1: the fused kernel is slower); TOPS counts 2*M*N*K of the "
          "main product only.")


if __name__ == "__main__":
    main()
