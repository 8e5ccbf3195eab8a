"""How far the exported run is from the torch quantized pipeline on the shipped default, next to how far the
torch pipeline moves when only its step-0 latent is moved by one float32 ulp (its own rounding spread).

    python bench/bench_export_vs_torch.py [--precision w4a4] [--photos chelsea,flower] [--seeds 0 1]

Exports the embedded model with `qdit4sr-export`'s defaults (the given precision, portable and cpu flavours)
into a temporary folder, then per held-out photo (128 px HR, 32 px LR) and seed: differing pixels, max
difference and PSNR between the runs, and each run's PSNR against the FP output. One thread everywhere.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.calibration.api import load_quantized_  # noqa: E402
from qdit4sr.calibration.cpu_weights import cpu_reference_  # noqa: E402
from qdit4sr.calibration.plan import BitPlan  # noqa: E402
from qdit4sr.engines.runtime import load_exported_pipeline  # noqa: E402
from qdit4sr.models.evaluate import held_out_set  # noqa: E402
from qdit4sr.models.images import HELD_OUT_PHOTOS, psnr  # noqa: E402
from qdit4sr.models.pipeline import DEFAULT_MODEL_DIR, DiT4SRPipeline  # noqa: E402
from qdit4sr.models.step_context import current_step  # noqa: E402


def compare(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(int) - b.astype(int))
    return f"{(d > 0).mean() * 100:.1f}% / {d.max()} / {psnr(a, b):.2f}"


def nudged_step0(transformer):
    """The transformer's forward with its step-0 latent moved up by one float32 ulp."""
    forward = transformer.forward

    def run(hidden_states, *rest):
        if current_step() == 0:
            hidden_states = torch.from_numpy(np.nextafter(hidden_states.numpy(), np.float32(np.inf)))
        return forward(hidden_states, *rest)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="w4a4")
    parser.add_argument("--photos", default=",".join(HELD_OUT_PHOTOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from qdit4sr.cli.export import export_command

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        t0 = time.perf_counter()
        export_command.main(["--out", str(folder), "--precision", args.precision], standalone_mode=False)
        print(f"export: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        fp = DiT4SRPipeline.from_folder(DEFAULT_MODEL_DIR)
        quant = copy.deepcopy(fp)
        load_quantized_(quant.transformer, BitPlan.load(folder / "quantized" / "bit_plan.json"),
                        folder / "quantized" / "weights.safetensors")
        cpu_ref = copy.deepcopy(quant)
        cpu_reference_(cpu_ref.transformer)
        runs = {name: load_exported_pipeline(folder, flavour=name, intra_op_num_threads=1)
                for name in ("portable", "cpu")}
        print(f"| photo | seed | portable vs torch | cpu vs torch | cpu vs its torch model | torch 1-ulp vs torch "
              f"| torch / portable vs FP (dB) |")
        print("|---|---|---|---|---|---|---|")
        for image in held_out_set(128, names=tuple(args.photos.split(","))):
            for seed in args.seeds:
                ref = quant.upscale(image.lr, seed=seed)
                got = {name: run.upscale(image.lr, seed=seed) for name, run in runs.items()}
                quant.transformer.forward = nudged_step0(quant.transformer)
                nudged = quant.upscale(image.lr, seed=seed)
                del quant.transformer.forward
                fp_out = fp.upscale(image.lr, seed=seed)
                print(f"| {image.name} | {seed} | {compare(got['portable'], ref)} | {compare(got['cpu'], ref)} | "
                      f"{compare(got['cpu'], cpu_ref.upscale(image.lr, seed=seed))} | {compare(nudged, ref)} | "
                      f"{psnr(ref, fp_out):.2f} / {psnr(got['portable'], fp_out):.2f} |", flush=True)
    print(f"\nCells: differing pixels / max difference (grey levels) / PSNR (dB). Precision {args.precision}, "
          f"`qdit4sr-export` defaults, one thread.")


if __name__ == "__main__":
    main()
