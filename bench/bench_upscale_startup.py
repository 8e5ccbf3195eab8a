"""Start-up cost of qdit4sr-upscale: what it imports before the first onnxruntime call, and --help.

    python bench/bench_upscale_startup.py [--repeats 5]

Each row is a fresh Python process (median wall time of the repeats, run interleaved so that a busy
machine slows every row alike). The baseline row imports what the runtime imported before the sampler
got its own flow-matching schedule: diffusers' scheduler and the transformer module (diffusers' SD3
blocks) on top of the runtime. Ratio = baseline time / row time, so above 1 is faster.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]

ROWS = {
    "baseline: runtime + diffusers scheduler + transformer module":
        "import qdit4sr.engines.runtime, qdit4sr.models.transformer, "
        "diffusers.schedulers.scheduling_flow_match_euler_discrete",
    "runtime (what qdit4sr-upscale imports to run)": "import qdit4sr.engines.runtime",
    "torch + onnxruntime alone (the floor)": "import torch, onnxruntime",
    "qdit4sr-upscale --help": "from qdit4sr.cli.upscale import upscale_command; upscale_command(['--help'])",
    "import qdit4sr": "import qdit4sr",
}


def wall_time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@click.command()
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(repeats: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(repeats):
        for name, code in ROWS.items():
            times[name].append(wall_time(code))
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = next(iter(medians.values()))
    print(f"| start-up ({repeats} fresh processes each, median) | seconds | baseline / row |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {baseline / seconds:.2f}x |")


if __name__ == "__main__":
    main()
