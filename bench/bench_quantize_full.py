"""Time and peak memory of `quantize_` (Hadamard, branches, VaSMP, VaTMP, residue quantization) over every
linear layer of the full-size DiT4SR transformer (random weights), on this machine's CPU.

    python bench/bench_quantize_full.py [--layers N] [--threads 2] [--method qdit4sr]

Goal: under 10 minutes on 2 cores, peak memory under 1.5x the fp32 model. `--method` is a row of
METHOD_PRESETS (default: the paper's Q-DiT4SR). `--layers` builds fewer blocks (same width) for a quick run;
the table then also extrapolates to 24 blocks, per block and per quantized weight element. The time is split
into the decomposition pass (H-SVD, or the budget-split search), GPTQ (with its activation-noise target),
the VaTMP schedule and the rest (VaSMP, RTN residue quantization, building the layers). The last rows time
the block-shape search alone on both layer shapes (median of 3): the exhaustive search over every feasible
shape with full SVDs, as a baseline, against the library's search over the finest feasible shapes.

The activation statistics are synthetic and set cost, not quality: 40 sampler steps (the pipeline's default)
of per-layer second moments with random trends, and, for GPTQ, input Gram matrices of Hadamard-rotated random
rows with log-normal channel scales (PSD, mean diagonal 1), float32 as an artifact stores them. A real
calibration holds one float32 Gram per layer (10.9 GiB for the full model, 6.6 GiB of it the 47 MLP down
projections at 6144 inputs; `quantize_` reads them from the artifact one layer at a time); GPTQ's cost
does not depend on the Gram's values, so the bench builds one per input width, before the timed run, and
shares it between all layers of that width (two matrices, 0.15 GiB), and reports what a real artifact holds.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout as well

from qdit4sr.calibration import api  # noqa: E402
from qdit4sr.calibration.api import quantize_  # noqa: E402
from qdit4sr.calibration.hadamard import apply_hadamard  # noqa: E402
from qdit4sr.calibration.hsvd import (DEFAULT_BLOCK_CANDIDATES, _blocks, choose_block_shape,  # noqa: E402
                                      feasible_block_shapes)
from qdit4sr.calibration.layers import example_inputs, quantizable_linears, used_linears  # noqa: E402
from qdit4sr.calibration.plan import METHOD_PRESETS, QDiT4SRConfig  # noqa: E402
from qdit4sr.calibration.qsoftmax import attention_cores  # noqa: E402
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig  # noqa: E402
from qdit4sr.models.config import DIT4SR_CONFIG  # noqa: E402
from qdit4sr.models.pipeline import PipelineConfig  # noqa: E402
from qdit4sr.models.transformer import DiT4SRTransformer2DModel  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_names(config: dict) -> list[str]:
    """Names of the linears a forward uses, traced on a narrow replica with the same block structure."""
    narrow = {**config, "num_attention_heads": 1, "attention_head_dim": 8, "caption_projection_dim": 8,
              "joint_attention_dim": 8, "pooled_projection_dim": 8, "pos_embed_max_size": 8}
    model = DiT4SRTransformer2DModel(**narrow)
    return list(used_linears(model, example_inputs(model)))


def random_model(config: dict, seed: int) -> DiT4SRTransformer2DModel:
    with torch.device("meta"):
        model = DiT4SRTransformer2DModel(**config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def random_gram(width: int, rows: int, seed: int) -> np.ndarray:
    """X^T X / rows (float64 sums, returned in float32 as an artifact stores it) for `rows` Hadamard-rotated
    random inputs with log-normal channel scales, normalised to mean diagonal 1: PSD like a calibration Gram
    (rank min(rows, width); GPTQ damps it)."""
    gen = torch.Generator().manual_seed(seed)
    channel = torch.exp(torch.randn(width, generator=gen))
    x = torch.randn(rows, width, generator=gen) * (channel / channel.square().mean().sqrt())
    x = apply_hadamard(x.double())
    return (x.mT @ x / rows).float().numpy()


class SharedGrams(Mapping):
    """layer -> synthetic input Gram [in, in], built on first use and shared by all layers of one input width.

    GPTQ's cost does not depend on the values, so two matrices (0.15 GiB at full width) stand in for the 533.
    """

    def __init__(self, in_features: dict[str, int], rows: int = 1024, seed: int = 0):
        self.in_features = dict(in_features)
        self.rows, self.seed = rows, seed
        self._by_width: dict[int, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        width = self.in_features[name]
        if width not in self._by_width:
            self._by_width[width] = random_gram(width, self.rows, self.seed + width)
        return self._by_width[width]

    def __iter__(self) -> Iterator[str]:
        return iter(self.in_features)

    def __len__(self) -> int:
        return len(self.in_features)

    def build(self) -> float:
        """Build every width's matrix now (outside a timed region: a real run only reads them); seconds taken."""
        t0 = time.perf_counter()
        for name in self:
            self[name]
        return time.perf_counter() - t0

    def held_bytes(self) -> int:
        return sum(g.nbytes for g in self._by_width.values())

    def real_bytes(self) -> int:
        """What one float32 Gram per layer, as a real calibration stores them, would take."""
        return sum(4 * w * w for w in self.in_features.values())


def synthetic_stats(model: torch.nn.Module, names: list[str], steps: int, gram: bool,
                    seed: int = 0) -> ActivationStats:
    """Statistics of the right shapes for `quantize_`: per-step second moments around 1 with a random
    trend per layer (so VaTMP has a schedule to find), amax 4 sigma, logit range 8, and shared Grams."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-0.5, 0.5, steps)
    v = np.exp(rng.uniform(-2.0, 2.0, (len(names), 1)) * t + rng.normal(0.0, 0.5, (len(names), 1)))
    linears = quantizable_linears(model)
    grams = SharedGrams({n: linears[n].in_features for n in names}, seed=seed) if gram else None
    timesteps = list(np.linspace(1000.0, 0.0, steps, endpoint=False))
    return ActivationStats(names, timesteps, v, 4.0 * np.sqrt(v), CalibrationConfig(num_images=0, gram=gram),
                           gram=grams).with_logit_range(list(attention_cores(model)), 8.0)


# quantize_'s stages, by the name `api` calls them under.
STAGES = {"split_weight": "decomposition", "gptq_quantize": "GPTQ", "activation_noise_target": "GPTQ",
          "schedule_shared": "VaTMP schedule"}


@contextmanager
def stage_times(module=api, stages: dict[str, str] = STAGES, cpu: dict[str, float] | None = None):
    """Seconds spent in each stage's functions while the block runs (wrapped in `module`, restored after);
    with `cpu`, also the process CPU time per stage (the figure that holds on a shared machine)."""
    totals = dict.fromkeys(stages.values(), 0.0)
    if cpu is not None:
        cpu.update(dict.fromkeys(stages.values(), 0.0))
    originals = {name: getattr(module, name) for name in stages}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[stages[name]] += time.perf_counter() - t0
                if cpu is not None:
                    cpu[stages[name]] += time.process_time() - c0
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, timed(name, fn))
    try:
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def full_model_weight_elements(config: dict) -> int:
    """Weight elements of the linears quantized in the full 24-block model (shapes only, on the meta device)."""
    with torch.device("meta"):
        model = DiT4SRTransformer2DModel(**config)
    linears = quantizable_linears(model)
    return sum(linears[n].weight.numel() for n in layer_names(config))


def exhaustive_block_search(residual: torch.Tensor, rank: int) -> tuple[int, int] | None:
    """The baseline: every feasible candidate scored by a full batched SVD of its blocks."""
    r64 = residual.double()
    total, best, best_err = r64.square().sum().item(), None, float("inf")
    for shape in feasible_block_shapes(*residual.shape, rank, DEFAULT_BLOCK_CANDIDATES, 1.0):
        top = torch.linalg.svdvals(_blocks(r64, *shape))[..., 0]
        err = total - top.square().sum().item()
        if err < best_err:
            best, best_err = shape, err
    return best


def block_search_rows(threads: int, rank: int = 32, repeats: int = 3) -> list[tuple[str, str]]:
    """Median time of the block-shape search on the two full-size layer shapes: baseline vs the library."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    for out, in_ in ((1536, 1536), (6144, 1536)):
        w = torch.randn(out, in_, generator=gen) * 0.02
        times = {}
        for label, fn in (("exhaustive SVD", lambda: exhaustive_block_search(w, rank)),
                          ("finest shapes, Gram", lambda: choose_block_shape(w, rank, DEFAULT_BLOCK_CANDIDATES, 1.0))):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                shape = fn()
                runs.append(time.perf_counter() - t0)
            times[label] = (statistics.median(runs), shape)
        (base, base_shape), (new, new_shape) = times.values()
        rows.append((f"block search {out}x{in_}: exhaustive / finest", f"{base:.2f} s / {new:.2f} s = {base / new:.1f}x"
                     f" (same shape: {base_shape == new_shape}, {new_shape})"))
    return rows


@click.command()
@click.option("--layers", "num_layers", type=int, default=24, show_default=True, help="Transformer blocks to build.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--precision", default="w4a4", show_default=True)
@click.option("--method", type=click.Choice(list(METHOD_PRESETS)), default="qdit4sr", show_default=True,
              help="A row of METHOD_PRESETS.")
def main(num_layers: int, threads: int, precision: str, method: str) -> None:
    torch.set_num_threads(threads)
    config = {**DIT4SR_CONFIG, "num_layers": num_layers,
              "dual_attention_layers": [i for i in DIT4SR_CONFIG["dual_attention_layers"] if i < num_layers]}
    names = layer_names(config)
    t0 = time.perf_counter()
    model = random_model(config, seed=0)
    build_s = time.perf_counter() - t0
    # Parameters plus buffers: the positional-embedding table alone is 0.84 GiB at any depth.
    fp32_bytes = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    linears = quantizable_linears(model)
    built_elements = sum(linears[n].weight.numel() for n in names)
    del linears
    rss_before = peak_rss_bytes()
    qconfig = QDiT4SRConfig.preset(method, precision)
    stats = synthetic_stats(model, names, PipelineConfig.num_inference_steps, qconfig.error_compensation != "none")
    gram_s = stats.gram.build() if stats.gram is not None else 0.0
    t0, cpu0 = time.perf_counter(), time.process_time()
    stage_cpu: dict[str, float] = {}
    with stage_times(cpu=stage_cpu) as stages:
        plan = quantize_(model, qconfig, stats, progress=True)
    quant_s, quant_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    peak = peak_rss_bytes()
    split = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if v > 0)
    rows = [("method", f"{method} ({precision}, rank {qconfig.rank}, {stats.second_moment.shape[1]} steps)"),
            ("blocks built", f"{num_layers}"), ("linear layers", f"{len(names)}"),
            ("fp32 model (parameters + buffers)", f"{fp32_bytes / 2**30:.2f} GiB"),
            ("build time", f"{build_s:.1f} s"),
            ("quantize_ time", f"{quant_s:.1f} s (CPU time of all threads: {quant_cpu_s:.1f} s)"),
            ("  of which", f"{split}, rest {quant_s - sum(stages.values()):.1f} s"),
            ("  CPU time of which", ", ".join(f"{k} {v:.1f} s" for k, v in stage_cpu.items() if v > 0)
             + f", rest {quant_cpu_s - sum(stage_cpu.values()):.1f} s"),
            ("peak RSS", f"{peak / 2**30:.2f} GiB"), ("peak RSS / fp32 model", f"{peak / fp32_bytes:.2f}x"),
            ("RSS after build / fp32 model", f"{rss_before / fp32_bytes:.2f}x"),
            ("mean weight bits (VaSMP)", f"{plan.mean_weight_bits():.3f}"),
            ("mean activation bits (VaTMP)", f"{plan.mean_act_bits():.3f} in {len(plan.segments)} segments")]
    if stats.gram is not None:
        rows.append(("Grams held (shared) / a real artifact's", f"{stats.gram.held_bytes() / 2**30:.2f} GiB / "
                     f"{stats.gram.real_bytes() / 2**30:.2f} GiB (float32; built in {gram_s:.1f} s, untimed)"))
    if num_layers != 24:
        full = {**DIT4SR_CONFIG, "num_layers": 24}
        per_element = quant_s * full_model_weight_elements(full) / built_elements
        rows.append(("time extrapolated to 24 blocks", f"{quant_s * 24 / num_layers:.0f} s per block, "
                                                       f"{per_element:.0f} s per weight element"))
    rows += block_search_rows(threads)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|------")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    main()
