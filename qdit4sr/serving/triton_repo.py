"""A Triton Inference Server model repository generated from an exported folder.

    repo = write_model_repository("engines/", "model_repo/", RepositorySettings(segment_form="onnxruntime"))
    # tritonserver --model-repository model_repo/

Everything comes from `manifest.json`: one model per timestep segment in one of three forms,

* "python":        Python backend running the portable graph with onnxruntime (runs on any Triton
                   with the Python backend; the form tested here),
* "onnxruntime":   Triton's onnxruntime backend on the portable graph (CPU or CUDA),
* "tensorrt_plan": the segment's TensorRT engine (`qdit4sr-export --flavour trt` on a GPU machine),

with explicit dims and dtypes, an instance group and dynamic batching (the tiles of concurrent
requests run as one batch), plus the `<prefix>_upscale` model: the sampler (codec, Euler loop, CFG,
tiling) in the Python backend, calling the segment model of each step through BLS (see
`python_models`). Every file taken from the export is checked against the manifest's sha256 while it
is copied (or linked), and every config.pbtxt is parsed back before the repository is moved into
place; an existing repository is replaced only with `force`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts.flavour import Flavour
from ..artifacts.manifest import MANIFEST_FILE, FileRef, Manifest, ManifestError, codec_files
from ..fileio import atomic_write
from . import layout
from .model_config import TRITON_DTYPES, Enum, check_model_config, parameters, render

SEGMENT_FORMS = ("python", "onnxruntime", "tensorrt_plan")
FILE_MODES = ("copy", "hardlink", "symlink")
PORTABLE = Flavour.PORTABLE   # the python and onnxruntime forms run the standard-ops graphs
_CHUNK = 1 << 22


class RepositoryError(ValueError):
    """The export cannot be turned into a repository (or the output folder is in the way); one line."""


@dataclass(frozen=True)
class RepositorySettings:
    segment_form: str = "python"
    prefix: str = "qdit4sr"
    max_batch_size: int | None = None      # None: the most tiles one sampler call sends (tile_batch, x2 with CFG)
    max_queue_delay_us: int = 2000         # how long the batcher waits for more tiles
    segment_instances: int = 1             # instances per segment model (per GPU with kind "gpu")
    upscale_instances: int = 2             # concurrent requests the sampler model works on
    instance_kind: str | None = None       # "cpu" / "gpu"; None: gpu for tensorrt_plan, cpu otherwise
    intra_op_threads: int = 0              # onnxruntime threads per segment instance (0: onnxruntime's choice)
    torch_threads: int = 0                 # torch threads of each sampler instance (0: torch's choice)
    files: str = "copy"                    # copy (relocatable), hardlink or symlink the export's files
    python_path: str | None = None         # folder holding the qdit4sr package, written into model.py;
    #                                        None: this package's folder, "": none (qdit4sr installed on the server)

    def __post_init__(self):
        if self.segment_form not in SEGMENT_FORMS:
            raise ValueError(f"segment_form must be one of {SEGMENT_FORMS}, got {self.segment_form!r}")
        if self.files not in FILE_MODES:
            raise ValueError(f"files must be one of {FILE_MODES}, got {self.files!r}")
        if self.instance_kind not in (None, "cpu", "gpu"):
            raise ValueError(f"instance_kind must be 'cpu' or 'gpu', got {self.instance_kind!r}")
        if not self.prefix or not all(c.isascii() and (c.isalnum() or c in "_-") for c in self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must be ASCII letters, digits, '_' or '-'")
        for name in ("segment_instances", "upscale_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_queue_delay_us", "intra_op_threads", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")

    @property
    def kind(self) -> str:
        return self.instance_kind or ("gpu" if self.segment_form == "tensorrt_plan" else "cpu")


@dataclass
class ModelRepository:
    """What was written: the root, the model names, and the settings actually used."""

    root: Path
    upscale_model: str
    segment_models: list[str]
    max_batch_size: int
    settings: RepositorySettings

    @property
    def models(self) -> list[str]:
        return [self.upscale_model, *self.segment_models]


# ----------------------------------------------------------------------------- files

def _hash_copy(src: Path, dst: Path, ref: FileRef, what: str) -> None:
    """Copy src to dst, hashing the bytes as they are written; refuse a file that is not the manifest's."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    if digest.hexdigest() != ref.sha256:
        raise RepositoryError(f"{what}: sha256 of {ref.path} does not match the manifest (file changed)")
    shutil.copystat(src, dst)


def _place(folder: Path, ref: FileRef, dst: Path, mode: str, what: str) -> None:
    """Put the export's file `ref` at dst (copy, hard link or symlink), verified against its sha256."""
    ref.verify(folder, what, check_hash=False)   # inside the folder, present, right size
    src = ref.resolve(folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        _hash_copy(src, dst, ref, what)
        return
    ref.verify(folder, what, check_hash=True)
    if mode == "hardlink":
        try:
            os.link(src, dst)
        except OSError as e:
            raise RepositoryError(f"cannot hard-link {src} into the repository ({e.strerror}); use copy") from e
    else:
        dst.symlink_to(src.resolve())


# ----------------------------------------------------------------------------- configs

def _tensor(spec, batched: bool) -> dict:
    if spec.dtype not in TRITON_DTYPES:
        raise RepositoryError(f"tensor {spec.name} has dtype {spec.dtype!r}, which has no Triton type")
    entry = {"name": spec.name, "data_type": Enum(TRITON_DTYPES[spec.dtype])}
    dims = [int(d) for d in spec.shape[1:]] if batched else list(spec.shape)
    if batched and layout.per_item_scalar(spec):
        entry.update(dims=[1], reshape={"shape": []})   # Triton needs a non-empty dims; the graph takes [batch]
    else:
        entry["dims"] = dims
    return entry


def _instance_group(count: int, kind: str) -> list[dict]:
    return [{"count": count, "kind": Enum("KIND_GPU" if kind == "gpu" else "KIND_CPU")}]


def segment_config(manifest: Manifest, name: str, settings: RepositorySettings, max_batch_size: int) -> dict:
    form = settings.segment_form
    config: dict = {"name": name}
    if form == "tensorrt_plan":
        config["platform"] = "tensorrt_plan"
    else:
        config["backend"] = "python" if form == "python" else "onnxruntime"
    config["max_batch_size"] = max_batch_size
    if form != "python":
        config["default_model_filename"] = layout.PLAN_FILE if form == "tensorrt_plan" else layout.ONNX_FILE
    config["input"] = [_tensor(s, batched=True) for s in manifest.inputs]
    config["output"] = [_tensor(s, batched=True) for s in manifest.outputs]
    config["instance_group"] = _instance_group(settings.segment_instances, settings.kind)
    config["dynamic_batching"] = {"max_queue_delay_microseconds": settings.max_queue_delay_us}
    if form == "onnxruntime":
        config["optimization"] = {"graph": {"level": -1}}   # ORT_ENABLE_BASIC, as the in-process runtime
        if settings.intra_op_threads:
            config["parameters"] = parameters({"intra_op_thread_count": settings.intra_op_threads})
    elif form == "python" and settings.intra_op_threads:
        config["parameters"] = parameters({layout.PARAM_INTRA_OP_THREADS: settings.intra_op_threads})
    return config


def upscale_config(name: str, segment_models: list[str], settings: RepositorySettings) -> dict:
    params = {layout.PARAM_SEGMENT_MODELS: ",".join(segment_models)}
    if settings.torch_threads:
        params[layout.PARAM_TORCH_THREADS] = settings.torch_threads
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,   # one image per request: images differ in size, their tiles batch in the segments
        "input": [{"name": layout.IMAGE_INPUT, "data_type": Enum("TYPE_UINT8"), "dims": [-1, -1, 3]},
                  {"name": layout.SEED_INPUT, "data_type": Enum("TYPE_INT64"), "dims": [1]}],
        "output": [{"name": layout.IMAGE_OUTPUT, "data_type": Enum("TYPE_UINT8"), "dims": [-1, -1, 3]}],
        "instance_group": [{"count": settings.upscale_instances, "kind": Enum("KIND_CPU")}],
        "parameters": parameters(params),
    }


def model_py(class_name: str, python_path: str) -> str:
    """The `model.py` of a Python-backend model: a shim importing the implementation from qdit4sr."""
    return f'''"""Generated by qdit4sr-triton-repo: {class_name} of a Q-DiT4SR export.

The implementation is qdit4sr.serving.python_models.{class_name}.
"""
import os
import sys

# The Python backend's stub ignores PYTHONPATH: the folder that held the qdit4sr package when this
# repository was generated is put first on sys.path when it exists here (a server with qdit4sr
# installed needs none, and generates with --python-path "").
_QDIT4SR_PATH = {python_path!r}
if _QDIT4SR_PATH and os.path.isdir(_QDIT4SR_PATH) and _QDIT4SR_PATH not in sys.path:
    sys.path.insert(0, _QDIT4SR_PATH)

from qdit4sr.serving.python_models import {class_name} as TritonPythonModel  # noqa: E402,F401
'''


def _write_config(model_dir: Path, config: dict) -> None:
    text = render(config) + "\n"
    check_model_config(text)   # schema-checked when tritonclient is installed
    (model_dir / "config.pbtxt").write_text(text)


# ----------------------------------------------------------------------------- repository

def pipeline_call_batch(manifest: Manifest) -> int:
    """The most tiles one transformer call of the sampler sends: tile_batch, twice that with CFG."""
    cfg = manifest.pipeline_config()
    return cfg.tile_batch * (2 if cfg.guidance_scale > 1.0 else 1)


def _segment_files(manifest: Manifest, seg, form: str) -> list[tuple[FileRef, str, str]]:
    """(file in the export, name in the version folder, what it is) for one segment model."""
    if form == "tensorrt_plan":
        if seg.engine is None:
            raise RepositoryError(f"segment {seg.index} has no TensorRT engine in the manifest; build the engines on "
                                  f"a GPU machine (qdit4sr-build-engines) or use another --segment-form")
        return [(seg.engine, layout.PLAN_FILE, f"segment {seg.index} engine")]
    if PORTABLE not in seg.graphs:
        raise RepositoryError(f"segment {seg.index} has no portable graph (flavours {sorted(seg.graphs)}); "
                              f"the {form} form runs the portable graphs")
    files = [(seg.graphs[PORTABLE], layout.ONNX_FILE, f"segment {seg.index} portable graph")]
    if manifest.shared_weights is not None:
        # The graphs name their external data file relative to themselves: it keeps its name beside model.onnx.
        files.append((manifest.shared_weights, Path(manifest.shared_weights.path).name, "shared weights"))
    return files


def _copy_codec(manifest: Manifest, export: Path, target: Path) -> None:
    """A VAE codec's graphs travel with the sampler, which runs them (checked against the manifest)."""
    for part, ref in codec_files(manifest.codec).items():
        _place(export, ref, target / ref.path, "copy", f"VAE {part} graph")


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise RepositoryError(f"{out} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _swap_into_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def default_python_path() -> str:
    """The folder holding this qdit4sr package (what the served models put on sys.path)."""
    return str(Path(__file__).resolve().parents[2])


def write_model_repository(export_dir: str | Path, out: str | Path, settings: RepositorySettings | None = None,
                           *, force: bool = False) -> ModelRepository:
    """Write a Triton model repository for the exported folder `export_dir` into `out`.

    Raises ManifestError for a broken export, RepositoryError (one line) for anything else in the way.
    Nothing is left at `out` unless the whole repository was written and its configs parse.
    """
    settings = settings or RepositorySettings()
    export, out = Path(export_dir), Path(out)
    # Structure, presence and sizes here; each file's sha256 as it is copied (every byte read once).
    manifest = Manifest.load(export, check_hashes=False)
    needed = pipeline_call_batch(manifest)
    max_batch = settings.max_batch_size or needed
    if max_batch < needed:
        raise RepositoryError(f"max_batch_size {max_batch} is below the {needed} tiles one sampler call sends "
                              f"(tile_batch {manifest.sampler['tile_batch']}"
                              f"{', x2 for CFG' if needed > manifest.sampler['tile_batch'] else ''})")
    python_path = default_python_path() if settings.python_path is None else settings.python_path
    segment_names = [layout.segment_model_name(settings.prefix, s.index) for s in manifest.segments]
    upscale_name = layout.upscale_model_name(settings.prefix)
    plans = [_segment_files(manifest, seg, settings.segment_form) for seg in manifest.segments]

    staging = _prepare_out(out, force)
    try:
        for seg, name, files in zip(manifest.segments, segment_names, plans):
            version = staging / name / layout.VERSION
            version.mkdir(parents=True)
            for ref, target, what in files:
                _place(export, ref, version / target, settings.files, what)
            if settings.segment_form == "python":
                (version / layout.MODEL_PY).write_text(model_py("SegmentModel", python_path))
            _write_config(staging / name, segment_config(manifest, name, settings, max_batch))

        version = staging / upscale_name / layout.VERSION
        sampler = version / layout.EXPORT_SUBDIR
        sampler.mkdir(parents=True)
        shutil.copy2(export / MANIFEST_FILE, sampler / MANIFEST_FILE)
        # The sampler's own files are always copied: they are small, and the sampler verifies them at load.
        _place(export, manifest.plan, sampler / manifest.plan.path, "copy", "bit plan")
        if manifest.prompt_embeds is not None:
            _place(export, manifest.prompt_embeds, sampler / manifest.prompt_embeds.path, "copy", "prompt embeddings")
        _copy_codec(manifest, export, sampler)
        (version / layout.MODEL_PY).write_text(model_py("UpscaleModel", python_path))
        _write_config(staging / upscale_name, upscale_config(upscale_name, segment_names, settings))

        record = {"export": str(export.resolve()), "model_hash": manifest.model_hash, "precision": manifest.precision,
                  "models": [upscale_name, *segment_names], "max_batch_size": max_batch,
                  "settings": {**asdict(settings), "python_path": python_path}}
        atomic_write(staging / layout.REPOSITORY_RECORD,
                     lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelRepository(out, upscale_name, segment_names, max_batch, settings)


__all__ = ["SEGMENT_FORMS", "FILE_MODES", "RepositoryError", "RepositorySettings", "ModelRepository",
           "ManifestError", "write_model_repository", "segment_config", "upscale_config", "pipeline_call_batch"]
