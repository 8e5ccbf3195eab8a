"""The export chain as stages, each from one artifact to the next, cached in the output folder.

    model folder --calibrate--> calibration/activation_stats.*  (per-layer, per-step activation moments)
                 --quantize---> quantized/bit_plan.json + quantized/weights.safetensors
                 --export-----> segment_kk.{portable,trt}.onnx + weights.bin + manifest.json
                 --engines----> segment_kk.plan (where TensorRT and a GPU exist)
                 --crops------> comparison/crops.npz  (bicubic / FP / quantized upscales of a held-out photo)
                 --report-----> report/report.md + PNG plots

A rerun with the same settings resumes from the last complete stage: every artifact is written
atomically, and the manifest is written last, so an interrupted run never looks finished.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts.flavour import ENGINE_FLAVOUR
from ..artifacts.manifest import MANIFEST_FILE, PROMPT_FILE, WEIGHTS_FILE, codec_files
from ..calibration.api import load_quantized_, quantize_, save_quantized
from ..calibration.layers import example_inputs, used_linears
from ..calibration.plan import BitPlan
from ..calibration.stats import ActivationStats, CalibrationConfig, collect_activation_stats
from ..fileio import atomic_write, atomic_write_text
from ..models.pipeline import DEFAULT_MODEL_DIR, DiT4SRPipeline, PromptEmbeddings, PromptError
from ..models.placement import model_dtype, peak_device_bytes, reset_peak
from .settings import ExportSettings

RUN_FILE = "run.json"
RUN_VERSION = 3  # 2: settings grouped by concern (model, quantization, calibration, export); 3: sampler, dtype
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ExportError(RuntimeError):
    """A problem with the user's input or output folder, reported as one line."""


@dataclass
class StageLog:
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # warnings about the user's input, e.g. image conversions
    device_peak: dict[str, int] = field(default_factory=dict)   # stage -> peak accelerator bytes (not on the CPU)


# -- output folder ---------------------------------------------------------------------------------

def prepare_out_dir(out: Path, settings: ExportSettings, model_hash: str, force: bool) -> bool:
    """Create or check the output folder; returns True when resuming a run with the same settings."""
    # Through JSON, so that it compares equal to the record read back from run.json.
    record = json.loads(json.dumps({"version": RUN_VERSION, "model_hash": model_hash,
                                    "settings": settings.cached_record()}))
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    resuming = False
    if out.exists() and any(out.iterdir()):
        run_file = out / RUN_FILE
        previous = None
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                previous = None
        if isinstance(previous, dict) and {k: previous.get(k) for k in record} == record:
            resuming = True
        elif force:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            why = "was made with other settings or another model" if previous else "is not empty"
            raise ExportError(f"output folder {out} {why}; pass --force to overwrite it or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write into {out}: {e.strerror or e}") from e
    # Where this run computes is recorded beside the cached record, not compared with it.
    placement = {"device": settings.device.device, "offload": settings.device.offload}
    atomic_write_text(out / RUN_FILE, json.dumps({**record, "placement": placement}, indent=1) + "\n")
    return resuming


# -- stages ------------------------------------------------------------------------------------------

def read_prompt(settings: ExportSettings, folder: Path) -> PromptEmbeddings | None:
    """The --prompt-embeds file, its shapes checked against the transformer's config.json before the
    (possibly minutes long) model load; None when no file was given."""
    from ..models.loading import CheckpointError, read_config

    if not settings.model.prompt_embeds:
        return None
    path = Path(settings.model.prompt_embeds)
    try:
        prompt = PromptEmbeddings.from_file(path)
    except PromptError as e:
        raise ExportError(f"--prompt-embeds: {e}") from e
    try:
        config = read_config(folder / "transformer")
    except (CheckpointError, OSError):
        config = {}    # the model load reports that; the pipeline then checks the prompt
    if "joint_attention_dim" in config and "pooled_projection_dim" in config:
        try:
            prompt.validate(int(config["joint_attention_dim"]), int(config["pooled_projection_dim"]))
        except PromptError as e:
            raise ExportError(f"--prompt-embeds {path.name}: {e}") from e
    return prompt


def load_pipeline(settings: ExportSettings) -> DiT4SRPipeline:
    """The FP pipeline in the settings' model dtype (read straight into it), sampler overrides applied."""
    from ..models.loading import CheckpointError

    try:
        settings.device.check_available()   # before a long load, not after it
    except ValueError as e:
        raise ExportError(str(e)) from e
    folder = Path(settings.model.path) if settings.model.path else DEFAULT_MODEL_DIR
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist")
    prompt = read_prompt(settings, folder)
    try:
        overrides = {"variant": settings.model.variant} if settings.model.variant else None
        pipe = DiT4SRPipeline.from_folder(folder, transformer_overrides=overrides, dtype=settings.device.torch_dtype,
                                          prompt=prompt, **settings.sampler.overrides())
    except PromptError as e:
        raise ExportError(f"--prompt-embeds {Path(settings.model.prompt_embeds or '').name}: {e}" if prompt
                          else f"{folder / PROMPT_FILE}: {e}") from e
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ExportError(f"cannot load the model from {folder}: {e}") from e
    return pipe


def default_calib_size(pipe: DiT4SRPipeline, scale: int = 4) -> int:
    """LR crop side whose x4 upscale is one transformer tile."""
    return pipe.config.tile_size * pipe.codec.downsample // scale


def resolve_settings(settings: ExportSettings, pipe: DiT4SRPipeline) -> ExportSettings:
    """The settings as this run uses them: rank for the model width, the sampler and crop size the
    pipeline runs, the prompt file's digest; a crop size the model cannot take is refused here."""
    from ..fileio import sha256_file

    size = settings.calibration.size or default_calib_size(pipe)
    align = pipe.codec.downsample * pipe.transformer.config.patch_size
    if (4 * size) % align:
        raise ExportError(f"--calib-size {size}: the x4 crop ({4 * size} px) must be a multiple of {align} px "
                          f"(codec x{pipe.codec.downsample}, patch {pipe.transformer.config.patch_size})")
    digest = sha256_file(Path(settings.model.prompt_embeds)) if settings.model.prompt_embeds else None
    return settings.for_width(pipe.transformer.inner_dim).resolved(pipe.config, size, digest)


def lr_crops_from_folder(folder: Path, lr_crop: int, count: int, seed: int,
                         notes: list[str] | None = None) -> list[torch.Tensor]:
    """Deterministic LR crops from the user's calibration images (read as `models.images.read_image_rgb8`
    does, each conversion noted in `notes`; at least lr_crop wide)."""
    from ..models.images import read_image_rgb8, to_tensor

    if not folder.is_dir():
        raise ExportError(f"calibration image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images = []
    for path in files:
        try:
            array, changes = read_image_rgb8(path)
        except ValueError as e:
            raise ExportError(f"{path.name}: {str(e).removeprefix(f'{path} ')}") from e
        if notes is not None:
            notes += [f"calibration image {path.name}: {c}" for c in changes]
        if min(array.shape[:2]) < lr_crop:
            raise ExportError(f"{path.name}: {array.shape[1]}x{array.shape[0]} is smaller than the "
                              f"{lr_crop}x{lr_crop} calibration crop")
        images.append(array)
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        array = images[i % len(images)]
        h, w = array.shape[:2]
        top, left = int(rng.integers(0, h - lr_crop + 1)), int(rng.integers(0, w - lr_crop + 1))
        crops.append(to_tensor(np.ascontiguousarray(array[top:top + lr_crop, left:left + lr_crop])))
    return crops


def calibrate(pipe: DiT4SRPipeline, settings: ExportSettings, folder: Path, log: StageLog) -> ActivationStats:
    stats_dir = folder / "calibration"
    dtype = model_dtype(pipe.transformer)   # the loaded dtype (--dtype); the trace runs in it
    layers = used_linears(pipe.transformer, tuple(t.to(dtype) for t in example_inputs(pipe.transformer)))
    if (stats_dir / "activation_stats.json").is_file():
        try:
            stats = ActivationStats.load(stats_dir)
            if stats.layers == list(layers) and len(stats.timesteps) == pipe.config.num_inference_steps:
                log.reused.append("calibration")
                return stats
        except (ValueError, OSError, KeyError):
            pass
    quant = settings.quant_config()
    lr_crop = settings.calibration.size or default_calib_size(pipe)
    config = CalibrationConfig(num_images=settings.calibration.count, lr_crop=lr_crop, seed=settings.seed,
                               gram=quant.error_compensation != "none", act_hist=quant.act_clip_search)
    images = None
    if settings.calibration.images:
        images = lr_crops_from_folder(Path(settings.calibration.images), lr_crop, settings.calibration.count,
                                      settings.seed, log.notes)
    reset_peak(settings.device)
    with pipe.placed(settings.device):
        stats = collect_activation_stats(pipe, layers, config, images=images)
    _note_peak(log, settings, "calibration")
    stats.save(stats_dir)
    log.done.append("calibration")
    return stats


def quantize(pipe: DiT4SRPipeline, stats: ActivationStats, settings: ExportSettings, folder: Path,
             log: StageLog) -> BitPlan:
    qdir = folder / "quantized"
    plan_file, weights_file = qdir / "bit_plan.json", qdir / "weights.safetensors"
    if plan_file.is_file() and weights_file.is_file():
        try:
            plan = BitPlan.load(plan_file)
            if plan.config == settings.quant_config():
                to_host_float32_(pipe, plan.config)
                load_quantized_(pipe.transformer, plan, weights_file)
                log.reused.append("quantization")
                return plan
        except (ValueError, OSError):
            pass
    reset_peak(settings.device)
    # Layer by layer on the device; the quantized layers stay where the model is (the device, or the
    # host when offloaded) and come to the host in float32 below.
    plan = quantize_(pipe.transformer, settings.quant_config(), stats, device=settings.device.torch_device)
    _note_peak(log, settings, "quantization")
    to_host_float32_(pipe, plan.config)
    qdir.mkdir(parents=True, exist_ok=True)
    save_quantized(pipe.transformer, weights_file)
    plan.save(plan_file)   # last: a plan file means the weights beside it are complete
    log.done.append("quantization")
    return plan


def to_host_float32_(pipe: DiT4SRPipeline, config) -> None:
    """The model (quantized or not) and codec back in host memory, the float tensors outside the quantized
    layers in float32 and rounded to the storage precision: the graphs are exported from float32 whatever
    dtype calibrated, and a resumed run gets the same model as a fresh one."""
    from ..calibration.api import round_unquantized_
    from ..calibration.qlinear import QuantLinear

    pipe.transformer.to("cpu")
    for module in pipe.transformer.modules():
        if not isinstance(module, QuantLinear):   # its tensors are in their storage dtypes already
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                        cast = t.detach().float()
                        store[name] = torch.nn.Parameter(cast, t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                            else cast
    round_unquantized_(pipe.transformer, config)
    pipe.device, pipe.dtype = torch.device("cpu"), torch.float32
    pipe.codec.to(pipe.device, pipe.dtype)


def _note_peak(log: StageLog, settings: ExportSettings, stage: str) -> None:
    peak = peak_device_bytes(settings.device)
    if peak is not None:
        log.device_peak[stage] = peak


def export(pipe: DiT4SRPipeline, plan: BitPlan, settings: ExportSettings, folder: Path, model_hash: str,
           log: StageLog):
    from ..artifacts.manifest import Manifest, ManifestError
    from .manifest_writer import build_manifest
    from .onnx_export import export_segments

    try:
        manifest = Manifest.load(folder)
        if manifest.model_hash == model_hash and manifest.plan.sha256 and \
                BitPlan.load(folder / manifest.plan.path).to_json() == plan.to_json():
            log.reused.append("ONNX export")
            return manifest
    except (ManifestError, OSError, ValueError):
        pass
    (folder / MANIFEST_FILE).unlink(missing_ok=True)   # an old manifest must not describe new graphs
    tokens = pipe.prompt.prompt_embeds.shape[1]
    exports = export_segments(pipe.transformer, plan, folder, tile_latent=pipe.config.tile_size,
                              text_tokens=tokens, flavour=settings.export.flavours)
    vae_spec = None
    if pipe.codec.kind == "vae":
        from .vae_export import export_vae

        vae_spec = export_vae(pipe.codec, folder)   # the folder serves without the model folder
    manifest = build_manifest(folder, exports, plan, model_hash=model_hash, pipeline_config=pipe.config,
                              codec=pipe.codec, transformer_config=pipe.transformer.config,
                              tile_latent=pipe.config.tile_size, text_tokens=tokens,
                              # The embedded model's null prompt is rebuilt by the runtime; anything else is written.
                              prompt=None if settings.model.path is None and not settings.model.prompt_embeds
                              else pipe.prompt,
                              vae_spec=vae_spec,
                              precision=settings.quantization.precision)
    manifest.save(folder)
    log.done.append("ONNX export")
    return manifest


def build_trt_engines(settings: ExportSettings, folder: Path, log: StageLog) -> list[Path]:
    from ..engines.build import build_engines, tensorrt_status

    if not settings.export.builds_engines:
        log.skipped.append(f"TensorRT engines: they are built from the {ENGINE_FLAVOUR} graphs, which "
                           f"--flavour did not ask for")
        return []
    available, reason = tensorrt_status()
    if not available:
        log.skipped.append(f"TensorRT engines were not built: {reason}")
        return []
    engines = build_engines(folder, settings.engines)
    log.done.append("TensorRT engines")
    return engines


def folder_size(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def _times(reference: int, size: int) -> str:
    """'1.80x smaller than' / '2.26x larger than': a size against the fp16 transformer, either way round."""
    if size <= reference:
        return f"{reference / max(size, 1):.2f}x smaller than"
    return f"{size / max(reference, 1):.2f}x larger than"


def weight_storage(plan: BitPlan) -> str:
    """How the weight codes are stored: INT4 for <= 4 bits, INT8 containers for wider codes."""
    bits = [int(b) for b in plan.weight_bits()]
    narrow, wide = [b for b in bits if b <= 4], [b for b in bits if b > 4]
    parts = []
    if narrow:
        parts.append(f"{len(narrow)} layer(s) as INT4 ({'/'.join(map(str, sorted(set(narrow))))}-bit codes)")
    if wide:
        padded = sorted(set(b for b in wide if b < 8))
        text = f"{len(wide)} layer(s) as INT8 ({'/'.join(map(str, sorted(set(wide))))}-bit codes)"
        if padded:
            text += (f": {'/'.join(map(str, padded))}-bit codes take 8 bits each, the size of w8a8 "
                     f"(TensorRT runs INT4 and INT8 weights only)")
        parts.append(text)
    return "; ".join(parts)


def activation_use(plan: BitPlan) -> str:
    """What the activation bits are, and whether they change with the timestep (VaTMP) or not."""
    config, k = plan.config, len(plan.segments)
    if config.act_bits == 16:
        return (f"full precision (A16): no activation or softmax quantization, so nothing depends on the timestep "
                f"and the {k} segment graph(s) compute the same function")
    if config.use_temporal:
        return (f"per layer and timestep segment (VaTMP over {k} segment(s)), mean {plan.mean_act_bits():.2f} bits")
    return (f"A{config.act_bits:g} in every layer and step: timestep-dependent bits (VaTMP) are off in this method; "
            f"the {k} segment(s) differ only in their static scales")


def setup_rows(settings: ExportSettings, pipe: DiT4SRPipeline) -> dict[str, str]:
    """How the run calibrated: the conditioning (which prompt, CFG or not), the sampler and the crops."""
    c = pipe.config
    if settings.model.prompt_embeds:
        source = f"--prompt-embeds {Path(settings.model.prompt_embeds).name}"
    elif (Path(settings.model.path or DEFAULT_MODEL_DIR) / PROMPT_FILE).is_file():
        source = f"the model folder's {PROMPT_FILE}"
    else:
        source = "null prompt (zeros: no --prompt-embeds, none in the model folder)"
    size = settings.calibration.size or default_calib_size(pipe)
    crops = f"{settings.calibration.count} crop(s) of {size}x{size} LR pixels from " + \
        (f"--calib-images {Path(settings.calibration.images).name}" if settings.calibration.images
         else "the bundled photos")
    where = f"model in {settings.device.dtype} on {settings.device.device}" + \
        (", one block at a time (offload)" if settings.device.offload else "")
    return {"conditioning": f"{source}: {pipe.prompt.describe(c.guidance_scale)}; the export runs the same",
            "sampler": f"{c.num_inference_steps} steps, shift {c.shift:g}, guidance {c.guidance_scale:g}",
            "calibration": f"{crops}; {where}"}


def device_rows(settings: ExportSettings, log: StageLog) -> dict[str, str]:
    """Peak accelerator memory per stage that ran there (printed only: it varies from run to run)."""
    if not log.device_peak:
        return {}
    gib = 2 ** 30
    peaks = ", ".join(f"{stage} {peak / gib:.2f} GiB" for stage, peak in log.device_peak.items())
    return {"peak memory": f"{settings.device.device}: {peaks} (torch.cuda.max_memory_allocated)"}


def run_summary(folder: Path, plan: BitPlan, manifest, log: StageLog, fp16_bytes: int,
                crops: dict | None = None, setup: dict[str, str] | None = None) -> dict[str, str]:
    """What the run produced, label -> value: printed at the end and put into the report.
    `setup` (see setup_rows) comes after the precision rows.

    No row names the output folder, so two runs into different folders report the same text."""
    weight_bytes = folder_size(folder, WEIGHTS_FILE)
    graphs = sorted(folder.glob("segment_*.onnx"))
    graph_bytes = sum(p.stat().st_size for p in graphs)
    engines = sorted(p.name for p in folder.glob("*.plan"))
    deployed = [folder / MANIFEST_FILE, *graphs, *(folder / name for name in engines)]
    deployed += [r.resolve(folder) for r in (manifest.plan, manifest.shared_weights, manifest.prompt_embeds) if r]
    deployed += [r.resolve(folder) for r in codec_files(manifest.codec).values()]
    deployed_bytes = sum(p.stat().st_size for p in set(deployed) if p.is_file())
    whole_bytes = sum(p.stat().st_size for p in folder.rglob("*")
                      if p.is_file() and "report" not in p.relative_to(folder).parts[:1])
    mib = 2 ** 20
    rows = {
        "precision": f"{manifest.precision}  (mean weight bits {plan.mean_weight_bits():.2f}, "
                     f"mean activation bits {plan.mean_act_bits():.2f})",
        "weight storage": weight_storage(plan),
        "activations": activation_use(plan),
        "segments": f"{len(plan.segments)}: " + ", ".join(f"steps {a}-{b - 1}" for a, b in plan.segments),
        "weights": f"{weight_bytes / mib:.2f} MiB in {WEIGHTS_FILE}, shared by every segment: "
                   f"{_times(fp16_bytes, weight_bytes)} the fp16 transformer ({fp16_bytes / mib:.2f} MiB)",
        "graphs": f"{len(graphs)} files, {graph_bytes / mib:.2f} MiB of graph structure",
        "deployed files": f"{deployed_bytes / mib:.2f} MiB ({WEIGHTS_FILE}, graphs, engines, manifest, plan, "
                          f"prompt{', VAE graphs' if codec_files(manifest.codec) else ''}): "
                          f"{_times(fp16_bytes, deployed_bytes)} the fp16 transformer",
        "whole folder": f"{whole_bytes / mib:.2f} MiB with the stage caches (report/ not counted): "
                        f"{_times(fp16_bytes, whole_bytes)} the fp16 transformer",
        "engines": ", ".join(engines) if engines else "none",
        **(setup or {}),
    }
    if crops is not None:
        rows["quality"] = crop_quality(crops)
    if log.reused:
        rows["reused"] = f"{', '.join(log.reused)} (cached from an earlier run)"
    return rows


def crop_quality(crops: dict) -> str:
    from ..models.images import psnr

    return (f"PSNR on the comparison crop: quantized vs FP {psnr(crops['quantized'], crops['FP']):.2f} dB, "
            f"quantized vs HR {psnr(crops['quantized'], crops['HR']):.2f} dB "
            f"(FP vs HR {psnr(crops['FP'], crops['HR']):.2f} dB, bicubic vs HR {psnr(crops['bicubic'], crops['HR']):.2f} dB)")


# -- comparison crops -----------------------------------------------------------------------------------

CROPS_FILE = "comparison/crops.npz"
CROPS_VERSION = 1
COMPARISON_PHOTO, COMPARISON_SIZE = "chelsea", 128   # a held-out photo, its HR centre crop


def crops_key(folder: Path, settings: ExportSettings, model_hash: str, sampler: dict) -> str:
    """Digest of everything the crops depend on: the FP model, the quantized weights and plan as cached in
    `folder`, the seed, the photo and the sampler settings. Any change gives another key."""
    import hashlib

    from ..fileio import sha256_file

    qdir = folder / "quantized"
    record = {"version": CROPS_VERSION, "model_hash": model_hash, "seed": settings.seed, "sampler": sampler,
              "photo": [COMPARISON_PHOTO, COMPARISON_SIZE], "variant": settings.model.variant,
              "plan": sha256_file(qdir / "bit_plan.json"), "weights": sha256_file(qdir / "weights.safetensors")}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _load_crops(path: Path, key: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in ("HR", "bicubic", "FP", "quantized")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):   # missing or damaged: recompute
        return None


def comparison_crops(settings: ExportSettings, quantized: DiT4SRPipeline, folder: Path, model_hash: str,
                     log: StageLog) -> dict | None:
    """Bicubic / FP / quantized on one held-out photo; only for the embedded model (cheap there).

    The two upscales are most of a resumed run's time, so they are cached in `folder/comparison/`
    under a key of what they depend on (`crops_key`) and recomputed only when that changes."""
    from dataclasses import asdict

    if settings.model.path is not None:
        log.skipped.append("report comparison crop (costly for a full-size model; run qdit4sr-upscale instead)")
        return None
    path = folder / CROPS_FILE
    key = crops_key(folder, settings, model_hash, asdict(quantized.config))
    crops = _load_crops(path, key)
    if crops is not None:
        log.reused.append("comparison crops")
        return crops
    from ..models.evaluate import bicubic_x4, held_out_set

    image = held_out_set(COMPARISON_SIZE, names=(COMPARISON_PHOTO,))[0]
    fp = load_pipeline(settings)
    crops = {"HR": image.hr, "bicubic": bicubic_x4(image.lr), "FP": fp.upscale(image.lr, seed=settings.seed),
             "quantized": quantized.upscale(image.lr, seed=settings.seed)}
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a name
            np.savez(f, key=np.array(key), **crops)

    atomic_write(path, save)
    log.done.append("comparison crops")
    return crops


def write_run_report(folder: Path, plan: BitPlan, stats: ActivationStats, crops: dict | None, summary: dict) -> Path:
    from .report import write_report

    return write_report(folder / "report", plan, stats, crops, summary)
