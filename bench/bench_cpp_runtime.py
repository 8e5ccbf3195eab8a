"""C++ runtime (qdit4sr-serve) vs Python runtime (load_exported_pipeline) on the same export and images.

    python bench/bench_cpp_runtime.py [--engines DIR] [--build DIR] [--repeats 5] [--threads 1]

Without --engines it exports the embedded tiny model at W4A4 (portable graphs, 4 segments, 2
calibration crops) into a temporary folder; without --build it builds serving/cpp there too (ONNX
Runtime headers from ../shared/third_party or QDIT4SR_THIRD_PARTY). Both runtimes use the same
onnxruntime settings (ORT_ENABLE_BASIC, --threads intra-op threads; torch also gets --threads).
Prints the median wall time per image (one runtime object, loaded once, timed per upscale call) and
per load, the ratio C++ / Python (below 1: C++ is faster), and whether the PNGs are identical.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGES = {"8x8 (1 tile)": (slice(100, 108), slice(200, 208)),
          "16x16 (3x3 tiles)": (slice(100, 116), slice(200, 216)),
          "32x32 (6x6 tiles)": (slice(90, 122), slice(190, 222))}


def make_export(out: Path) -> Path:
    from qdit4sr.calibration.plan import QuantizationSettings
    from qdit4sr.exporter.manifest_writer import transformer_hash
    from qdit4sr.exporter.settings import CalibrationSettings, ExportConfig, ExportSettings
    from qdit4sr.exporter.stages import (
        StageLog,
        calibrate,
        export,
        load_pipeline,
        quantize,
    )

    settings = ExportSettings(quantization=QuantizationSettings("w4a4", segments=4),
                                  calibration=CalibrationSettings(count=2),
                                  export=ExportConfig(flavours=("portable",)))
    pipe = load_pipeline(settings)
    settings = settings.for_width(pipe.transformer.inner_dim)
    out.mkdir(parents=True)
    log = StageLog()
    plan = quantize(pipe, calibrate(pipe, settings, out, log), settings, out, log)
    export(pipe, plan, settings, out, transformer_hash(pipe.transformer), log)
    return out


def build(build_dir: Path) -> Path:
    import pytest

    from tests.serving.cpp_build import cmake_build

    try:
        cmake_build(build_dir, targets=("qdit4sr-serve",))
    except (pytest.skip.Exception, AssertionError) as e:  # the test helper skips or fails with the reason
        raise SystemExit(f"cannot build serving/cpp: {e}") from None
    return build_dir / "qdit4sr-serve"


def time_python(folder: Path, images: dict[str, np.ndarray], repeats: int, threads: int):
    from qdit4sr.engines.runtime import load_exported_pipeline

    start = time.perf_counter()
    pipe = load_exported_pipeline(folder, intra_op_num_threads=threads)
    load = time.perf_counter() - start
    times, outputs = {}, {}
    for name, image in images.items():
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs[name] = pipe.upscale(image, seed=0)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    return load, times, outputs


def time_cpp(serve: Path, folder: Path, images: dict[str, np.ndarray], repeats: int, threads: int, work: Path):
    args = [str(serve), "--engines", str(folder), "--threads", str(threads)]
    names = []
    for k, (name, image) in enumerate(images.items()):
        Image.fromarray(image).save(work / f"lr{k}.png")
        for r in range(repeats):
            args += ["-i", str(work / f"lr{k}.png"), "-o", str(work / f"sr{k}_{r}.png")]
            names.append(name)
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(result.stderr)
    load = float(re.search(r"^loaded .* in ([\d.]+) s$", result.stdout, re.MULTILINE).group(1))
    runs = [float(v) for v in re.findall(r"^wrote .* in ([\d.]+) s$", result.stdout, re.MULTILINE)]
    times = {name: statistics.median([t for t, n in zip(runs, names) if n == name]) for name in images}
    outputs = {name: np.asarray(Image.open(work / f"sr{k}_0.png")) for k, name in enumerate(images)}
    return load, times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, help="exported folder (default: a fresh tiny W4A4 export)")
    parser.add_argument("--build", type=Path, help="serving/cpp build folder holding qdit4sr-serve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op (and torch) threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qdit4sr.models.images import load_photo

    photo = load_photo("chelsea")
    images = {name: np.ascontiguousarray(photo[crop]) for name, crop in IMAGES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.engines or make_export(tmp / "engines")
        serve = (args.build / "qdit4sr-serve") if args.build else build(tmp / "build")
        py_load, py_times, py_out = time_python(folder, images, args.repeats, args.threads)
        cpp_load, cpp_times, cpp_out = time_cpp(serve, folder, images, args.repeats, args.threads, tmp)
    print(f"runtime comparison: {folder if args.engines else 'tiny default, W4A4, 4 segments'}, "
          f"median of {args.repeats}, {args.threads} thread(s)\n")
    print("| LR image | Python (s) | C++ (s) | C++ / Python | same PNG |")
    print("|---|---|---|---|---|")
    print(f"| load (manifest, sha256, sessions) | {py_load:.3f} | {cpp_load:.3f} | {cpp_load / py_load:.2f} | - |")
    for name in images:
        same = "yes" if np.array_equal(py_out[name], cpp_out[name]) else \
            f"no ({int((py_out[name] != cpp_out[name]).sum())} values differ)"
        print(f"| {name} | {py_times[name]:.3f} | {cpp_times[name]:.3f} | "
              f"{cpp_times[name] / py_times[name]:.2f} | {same} |")


if __name__ == "__main__":
    main()
