"""The whole export of the full-width DiT4SR on CPU: per-stage time, peak RSS, file sizes, graph checks.

    python bench/bench_export_full.py [--blocks 24] [--flavour portable ...] [--keep DIR] [--profile-quantize 25]

A checkpoint folder in the published layout (every name and shape of the official transformer at
`--blocks` depth, random bf16 values; tests/models/official_checkpoint.py) with a random SD3.5-config
VAE and a pipeline.json of 2 sampler steps and 32x32-latent tiles is written by a child process, so
its memory does not count. Then the command itself runs in this process:
`qdit4sr-export --model FOLDER --dtype bfloat16 --steps 2 --calib-size 64 --calib-count 1` (one
calibration crop, 64 px LR -> a 32x32 latent), its stages and the steps of the ONNX export wrapped
to time them and sample this process's RSS: calibration, quantization, ONNX export (trace, constant
folding, fp16 storage, weights.bin, per-flavour graph rewrite and write, VAE graphs).
Every graph then passes onnx.checker's full check by path (graphs over 2 GB keep their weights in
weights.bin), and onnxruntime runs one forward of segment 0's portable graph.

Memory goal: the command's peak RSS (VmHWM when it returns) < 1.5 x the bf16 transformer bytes +
OVERHEAD_GIB (Python, torch, onnx and onnxruntime libraries, the SD3.5 VAE in float32 and its export,
calibration activations of one 32x32 tile); it must not grow per block beyond the model itself.
Printed as PASS/FAIL. The checks after the command (onnx.checker, the onnxruntime step, which folds
the dequantized weights to float32) are this bench's own and only get rows.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout as well (and finds tests/models/official_checkpoint.py)

OVERHEAD_GIB = 2.0
GIB, MIB = 2 ** 30, 2 ** 20
STEPS, TILE_LATENT = 2, 32

# The SD3.5 VAE's diffusers config (AutoencoderKL, 16 latent channels, /8).
SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)

_WRITER = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from diffusers import AutoencoderKL
from tests.models.official_checkpoint import official_config, write_official_checkpoint
folder, blocks = Path(sys.argv[2]), int(sys.argv[3])
write_official_checkpoint(folder, official_config(blocks))
torch.manual_seed(0)
AutoencoderKL(**json.loads(sys.argv[4])).save_pretrained(folder / "vae")
(folder / "pipeline.json").write_text(sys.argv[5])
"""


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class RssSampler:
    """Samples this process's RSS every `period` s; `stage()` records each stage's peak and time."""

    def __init__(self, period: float = 0.05):
        self.period, self.current_peak, self.rows = period, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.current_peak = max(self.current_peak, _status("VmRSS"))
            time.sleep(self.period)

    @contextmanager
    def stage(self, name: str):
        """Time and peak RSS of the block; nested in another stage, it is a row of its own too. Blocks of
        one name add up in one row (its time the sum, its RSS the highest peak)."""
        outer = self.current_peak
        names = [r[0] for r in self.rows]
        if name in names:
            row = names.index(name)
        else:
            row = len(self.rows)
            self.rows.append((name, 0.0, 0))   # its place: before the rows of nested stages
        self.current_peak = _status("VmRSS")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current_peak = max(self.current_peak, _status("VmRSS"))
            _, seconds, peak = self.rows[row]
            self.rows[row] = (name, seconds + time.perf_counter() - start, max(peak, self.current_peak))
            self.current_peak = max(outer, self.current_peak)

    def stop(self):
        self._stop.set()
        self._thread.join()


@contextmanager
def _patched(sampler: RssSampler, targets: list[tuple[object, str, str]]):
    """Each (owner, attribute, row) function timed as a row of its own; calls of one row add up."""
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def timed(original, row):
        def call(*args, **kwargs):
            with sampler.stage(row):
                return original(*args, **kwargs)
        return call

    for (owner, attr, original), (_, _, row) in zip(originals, targets):
        setattr(owner, attr, timed(original, row))
    try:
        yield
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def _rows(flavours: tuple[str, ...]) -> list[tuple[object, str, str]]:
    """The command's stages, and the export's steps nested in its row."""
    from qdit4sr.exporter import external_data, onnx_export, placeholder, stages, vae_export

    return [(stages, "load_pipeline", "load model"), (stages, "calibrate", "calibrate (1 crop, 2 steps)"),
            (stages, "quantize", "quantize"), (stages, "quantize_", "  decompose + quantize the layers"),
            (stages, "to_host_float32_", "  unquantized tensors to float32, rounded to fp16 values"),
            (stages, "save_quantized", "  quantized/weights.safetensors"),
            (stages, "export", "ONNX export (segments + VAE)"),
            (onnx_export, "trace_base_graph", "  trace (torch.onnx.export + constant folding)"),
            (placeholder, "fold_static_subgraphs", "    of which: constant folding"),
            (onnx_export, "compact_initializers", "  fp16 storage of the traced constants"),
            (external_data.WeightStore, "externalize", "  traced initializers -> weights.bin"),
            (onnx_export, "prepare_layer", "  quantized weights -> weights.bin"),
            (onnx_export, "cpu_weight_dq", "  cpu weights -> weights.bin"),
            (onnx_export, "rewrite_segment", "  graph rewrite (all segments and flavours)"),
            (onnx_export, "check_onnx", "  write + onnx check (segment graphs)"),
            (vae_export, "export_vae", "  VAE encoder + decoder graphs"),
            (stages, "run_summary", "summary + report")]


def write_model(folder: Path, blocks: int) -> float:
    from qdit4sr.models.pipeline import PipelineConfig

    pipeline = PipelineConfig(num_inference_steps=STEPS, tile_size=TILE_LATENT, tile_overlap=8)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _WRITER, str(REPO), str(folder), str(blocks), json.dumps(SD35_VAE),
                    json.dumps(asdict(pipeline))], check=True)
    return time.perf_counter() - start


def one_ort_step(path: Path, manifest) -> tuple[float, float]:
    """Seconds for one forward of the graph at batch 1 on random inputs, and max |velocity|."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in manifest.inputs:
        shape = [1 if isinstance(d, str) else d for d in spec.shape]
        feeds[spec.name] = (rng.random(shape, dtype=np.float32) * 500 if spec.name == "timestep"
                            else rng.standard_normal(shape, dtype=np.float32))
    start = time.perf_counter()
    out = session.run(None, feeds)[0]
    seconds = time.perf_counter() - start
    if not np.isfinite(out).all():
        raise RuntimeError(f"{path.name}: the velocity has non-finite values")
    return seconds, float(np.abs(out).max())


def _profile_top(profile, top: int) -> str:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def run(blocks: int, flavours: tuple[str, ...], work: Path, dtype: str, profile_quantize: int) -> bool:
    import onnx
    import torch

    from qdit4sr.artifacts.manifest import Manifest, codec_files
    from qdit4sr.cli.export import export_command
    from qdit4sr.exporter import stages

    model_dir, out = work / "model", work / "engines"
    shutil.rmtree(out, ignore_errors=True)   # every stage is measured: nothing resumes from an earlier run
    write_s = write_model(model_dir, blocks)
    args = ["--model", str(model_dir), "--out", str(out), "--force", "--dtype", dtype, "--steps", str(STEPS),
            "--calib-size", str(TILE_LATENT * 8 // 4), "--calib-count", "1"]
    for flavour in flavours:
        args += ["--flavour", flavour]
    seen = {}
    load = stages.load_pipeline

    def load_and_keep(settings):
        seen["pipe"] = pipe = load(settings)
        seen["dtype"] = next(pipe.transformer.parameters()).dtype
        # Parameters and buffers (the 384x384 position table is a buffer): what the bf16 checkpoint holds.
        seen["bf16"] = sum(t.numel() * 2 for t in pipe.transformer.state_dict().values())
        return pipe

    profile = None
    if profile_quantize:
        import cProfile

        profile, quantize = cProfile.Profile(), stages.quantize

        def profiled(*a, **k):
            return profile.runcall(quantize, *a, **k)
    baseline = _status("VmRSS")
    sampler = RssSampler()
    total = time.perf_counter()
    try:
        stages.load_pipeline = load_and_keep
        if profile is not None:
            stages.quantize = profiled
        try:
            with _patched(sampler, _rows(flavours)):
                export_command.main(args, standalone_mode=False)
        finally:
            stages.load_pipeline = load
            if profile is not None:
                stages.quantize = quantize
        export_s = time.perf_counter() - total
        # The goal is the command's: the checks below (onnxruntime folds the dequantized weights to float32)
        # are this bench's own and get rows of their own.
        peak = max(_status("VmHWM"), sampler.current_peak)
        loaded_dtype, bf16_bytes = seen.pop("dtype"), seen.pop("bf16")
        seen.clear()    # the pipeline goes with the command's frame
        manifest = Manifest.load(out)
        graphs = sorted(out.glob("segment_*.onnx")) + [r.resolve(out) for r in codec_files(manifest.codec).values()]
        with sampler.stage(f"onnx.checker full_check ({len(graphs)} graphs)"):
            for path in graphs:
                onnx.checker.check_model(str(path), full_check=True)
        portable = [seg.graphs for seg in manifest.segments][0].get("portable")
        ort_row = "not run (no portable graph exported)"
        if portable is not None:
            with sampler.stage("onnxruntime: one step of segment 0 (portable)"):
                seconds, vmax = one_ort_step(portable.resolve(out), manifest)
            ort_row = f"{seconds:.2f} s, max |velocity| {vmax:.3g}, finite"
    finally:
        sampler.stop()
    limit = 1.5 * bf16_bytes + OVERHEAD_GIB * GIB

    print(f"\n## Full-width export, {blocks} block(s), {STEPS} steps, 1 calibration crop ({TILE_LATENT}x{TILE_LATENT} "
          f"latent), flavours {', '.join(flavours)}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"command: qdit4sr-export {' '.join(args)}\n")
    print(f"transformer: {bf16_bytes / 2 / 1e6:.0f} M values (parameters and buffers), "
          f"{bf16_bytes / GIB:.2f} GiB in bf16; "
          f"loaded as {str(loaded_dtype).removeprefix('torch.')}; checkpoint + VAE written in {write_s:.0f} s "
          f"(child process, not counted)\n")
    print("| stage | time (s) | peak RSS (GiB) |\n|---|---:|---:|")
    print(f"| baseline (libraries imported) | | {baseline / GIB:.2f} |")
    for name, seconds, rss in sampler.rows:
        print(f"| {name} | {seconds:.1f} | {rss / GIB:.2f} |")
    print(f"| **command total (load to report; peak: VmHWM at its end)** | **{export_s:.1f}** | **{peak / GIB:.2f}** |")
    print("\n| file | size (MiB) |\n|---|---:|")
    for path in sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")):
        print(f"| {path.name} | {path.stat().st_size / MIB:.1f} |")
    print(f"\nonnx.checker full_check: {len(graphs)} graphs pass; onnxruntime step: {ort_row}")
    if profile is not None:
        print(f"\n### quantize stage, cProfile by cumulative time\n\n```\n{_profile_top(profile, profile_quantize)}```")
    ok = peak < limit
    print(f"command peak RSS {peak / GIB:.2f} GiB vs limit 1.5 x {bf16_bytes / GIB:.2f} GiB (bf16 model) + {OVERHEAD_GIB:.1f} "
          f"GiB = {limit / GIB:.2f} GiB: {'PASS' if ok else 'FAIL'}")
    return ok


@click.command()
@click.option("--blocks", type=click.IntRange(1, 24), default=24, show_default=True,
              help="Transformer depth (full width); fewer for a quick run.")
@click.option("--flavour", "flavours", multiple=True, default=("portable", "trt", "cpu"), show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="bfloat16", show_default=True,
              help="--dtype of the command: the model's dtype while calibrating and quantizing.")
@click.option("--profile-quantize", type=click.IntRange(min=0), default=0,
              help="Print the quantize stage's top N functions by cumulative time (cProfile).")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Work in this folder and keep it (default: a temporary folder, removed).")
def main(blocks: int, flavours: tuple[str, ...], dtype: str, profile_quantize: int, keep: Path | None):
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        ok = run(blocks, flavours, keep, dtype, profile_quantize)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_export_full_") as tmp:
            ok = run(blocks, flavours, Path(tmp), dtype, profile_quantize)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
