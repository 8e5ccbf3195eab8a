"""`manifest.json`: what a runtime needs to run an exported Q-DiT4SR folder, and proof that it is intact.

It names the model (hash of the full-precision transformer), the precision and bit plan, the sampler
settings, the latent codec, the prompt embeddings, and per timestep segment the graph files of each
flavour (and the TensorRT engine once built), all with sha256 digests. `Manifest.load` refuses a
folder whose files are missing or changed, whose version is unknown, or whose segments do not cover
the sampler steps contiguously, with a `ManifestError` that names the problem. A runtime asks only for
its own flavour's files (`flavours=`), so a folder without the other flavour's graphs still runs.

The exporter writes the folder (`qdit4sr.exporter.manifest_writer`); runtimes only read it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..calibration.plan import BitPlan, step_to_segment
from ..fileio import atomic_write_text, sha256_file
from .flavour import ENGINE_FLAVOUR, Flavour

if TYPE_CHECKING:  # the sampler and codec classes pull in diffusers: imported when first used
    from ..models.pipeline import PipelineConfig

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "bit_plan.json"
PROMPT_FILE = "prompt_embeds.safetensors"
WEIGHTS_FILE = "weights.bin"      # the initializers every segment graph shares
VAE_ENCODER_FILE, VAE_DECODER_FILE = "vae_encoder.onnx", "vae_decoder.onnx"   # a VAE codec's FP graphs
# A "vae" codec's fields besides its graphs (the scaling and shift are applied inside them; recorded to
# describe the latent space). The runtimes tile images larger than tile_px as the torch codec does.
VAE_CODEC_KEYS = ("scaling", "shift", "downsample", "latent_channels", "tile_px", "overlap_px")
TRANSFORMER_KEYS = ("patch_size", "in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim")


def graph_file_name(segment: int, flavour: str) -> str:
    return f"segment_{segment:02d}.{flavour}.onnx"


def engine_file_name(segment: int) -> str:
    """`segment_<kk>.plan`, beside `segment_<kk>.<flavour>.onnx`."""
    return f"segment_{segment:02d}.plan"


class ManifestError(ValueError):
    """An exported folder whose manifest is missing, malformed, or disagrees with the files."""


# ----------------------------------------------------------------------------- parts

@dataclass(frozen=True)
class FileRef:
    """A file inside the exported folder (relative path), its size and sha256."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, folder: Path, path: str | Path) -> "FileRef":
        path = Path(path)
        rel = path.relative_to(folder) if path.is_absolute() else path
        full = Path(folder) / rel
        return cls(rel.as_posix(), sha256_file(full), full.stat().st_size)

    def resolve(self, folder: Path) -> Path:
        return Path(folder) / self.path

    def verify(self, folder: Path, what: str, check_hash: bool = True) -> None:
        full = self.resolve(folder)
        if Path(self.path).is_absolute() or ".." in Path(self.path).parts:
            raise ManifestError(f"{what}: path {self.path!r} must stay inside the folder")
        if not full.is_file():
            raise ManifestError(f"{what}: file {self.path} is missing")
        size = full.stat().st_size
        if size != self.size:
            raise ManifestError(f"{what}: {self.path} has {size} bytes, the manifest says {self.size}")
        if check_hash and sha256_file(full) != self.sha256:
            raise ManifestError(f"{what}: sha256 of {self.path} does not match the manifest (file changed)")


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]       # "batch" for the dynamic axis
    dtype: str


@dataclass
class SegmentEntry:
    index: int
    steps: list[int]             # [start, end) sampler steps
    timesteps: list[float]
    graphs: dict[str, FileRef]   # flavour -> graph file
    engine: FileRef | None = None


def _file_ref(raw: dict | None) -> FileRef | None:
    return None if raw is None else FileRef(str(raw["path"]), str(raw["sha256"]), int(raw["size"]))


# ----------------------------------------------------------------------------- manifest

@dataclass
class Manifest:
    model_hash: str
    precision: str
    plan: FileRef
    sampler: dict[str, Any]              # PipelineConfig fields
    codec: dict[str, Any]                # pixel-unshuffle json, or a "vae" codec (vae_graphs, VAE_CODEC_KEYS)
    transformer: dict[str, int]          # the config fields a sampler needs
    tile_latent: int
    text_tokens: int
    segments: list[SegmentEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    shared_weights: FileRef | None = None
    prompt_embeds: FileRef | None = None
    version: int = MANIFEST_VERSION

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.segments[-1].steps[1] if self.segments else 0

    @property
    def flavours(self) -> list[str]:
        return sorted(self.segments[0].graphs) if self.segments else []

    def pipeline_config(self) -> "PipelineConfig":
        from ..models.pipeline import PipelineConfig

        return PipelineConfig(**self.sampler)

    def segment_of_step(self, step: int) -> int:
        segment_map = step_to_segment([seg.steps for seg in self.segments])
        if not 0 <= step < len(segment_map):
            raise IndexError(f"sampler step {step} is outside the {self.num_steps} exported steps")
        return segment_map[step]

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def save(self, folder: str | Path) -> Path:
        target = Path(folder) / MANIFEST_FILE
        text = self.to_json()
        atomic_write_text(target, text)
        return target

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{MANIFEST_FILE} is not valid JSON (truncated or corrupted?): {e}") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"{MANIFEST_FILE} must hold a JSON object")
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {raw.get('version')!r} is not supported "
                                f"(this runtime reads version {MANIFEST_VERSION})")
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in raw
                         and f.name not in ("shared_weights", "prompt_embeds", "version"))
        if missing:
            raise ManifestError(f"manifest lacks the fields {missing}")
        try:
            return cls(**{**{k: v for k, v in raw.items() if k in known},
                          "plan": _file_ref(raw["plan"]), "shared_weights": _file_ref(raw.get("shared_weights")),
                          "prompt_embeds": _file_ref(raw.get("prompt_embeds")),
                          "segments": [SegmentEntry(int(s["index"]), [int(a) for a in s["steps"]],
                                                    [float(t) for t in s["timesteps"]],
                                                    {fl: _file_ref(g) for fl, g in s["graphs"].items()},
                                                    _file_ref(s.get("engine"))) for s in raw["segments"]],
                          "inputs": [TensorSpec(**t) for t in raw["inputs"]],
                          "outputs": [TensorSpec(**t) for t in raw["outputs"]]})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"manifest has malformed fields: {e!r}") from e

    @classmethod
    def load(cls, folder: str | Path, check_hashes: bool = True,
             flavours: Iterable[Flavour | str] | None = None) -> "Manifest":
        """Read and validate `folder/manifest.json` against the files beside it.

        `flavours` limits the graph files checked to those a runtime of these flavours reads (the
        engines belong to the engine flavour); None checks every file the manifest names. The files
        every flavour uses (plan, shared weights, prompt) are always checked.
        """
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_FILE} in {folder}")
        manifest = cls.from_json(path.read_text())
        manifest.validate(folder, check_hashes, flavours)
        return manifest

    # -- validation ------------------------------------------------------------------------------
    def validate(self, folder: Path, check_hashes: bool = True,
                 flavours: Iterable[Flavour | str] | None = None) -> None:
        """Raise ManifestError unless the manifest is consistent and the files it names for `flavours`
        (all of them when None) are in place, with the recorded sizes and, when check_hashes, digests."""
        self._validate_segments()
        if flavours is None:
            used = set(self.flavours)
        else:
            used = {str(Flavour.parse(f)) for f in flavours}
            if not used <= set(self.flavours):
                raise ManifestError(f"the folder has no {', '.join(sorted(used - set(self.flavours)))} graphs "
                                    f"(it has {', '.join(self.flavours)})")
        self._validate_settings()
        self.plan.verify(folder, "bit plan", check_hashes)
        if self.shared_weights is not None:
            self.shared_weights.verify(folder, "shared weights", check_hashes)
        if self.prompt_embeds is not None:
            self.prompt_embeds.verify(folder, "prompt embeddings", check_hashes)
        for part, ref in codec_files(self.codec).items():
            ref.verify(folder, f"VAE {part} graph", check_hashes)
        for seg in self.segments:
            for flavour, ref in seg.graphs.items():
                if flavour in used:
                    ref.verify(folder, f"segment {seg.index} {flavour} graph", check_hashes)
            if seg.engine is not None and (flavours is None or str(ENGINE_FLAVOUR) in used):
                seg.engine.verify(folder, f"segment {seg.index} engine", check_hashes)
        plan = BitPlan.load(self.plan.resolve(folder)) if check_hashes else None
        if plan is not None and [list(s) for s in plan.segments] != [s.steps for s in self.segments]:
            raise ManifestError(f"segments {[s.steps for s in self.segments]} differ from the bit plan's "
                                f"{[list(s) for s in plan.segments]}")

    def _validate_segments(self) -> None:
        if not self.segments:
            raise ManifestError("manifest lists no segments")
        expected_start = 0
        for i, seg in enumerate(self.segments):
            if seg.index != i:
                raise ManifestError(f"segment at position {i} has index {seg.index}; indices must run 0..K-1")
            if len(seg.steps) != 2:
                raise ManifestError(f"segment {i}: steps must be [start, end), got {seg.steps}")
            start, end = seg.steps
            if start != expected_start:
                raise ManifestError(f"segments are not contiguous: segment {i} starts at step {start}, "
                                    f"expected {expected_start}")
            if end <= start:
                raise ManifestError(f"segment {i} is empty or reversed: steps [{start}, {end})")
            if len(seg.timesteps) != end - start:
                raise ManifestError(f"segment {i}: {len(seg.timesteps)} timesteps for {end - start} steps")
            if not seg.graphs:
                raise ManifestError(f"segment {i} has no graph file")
            if sorted(seg.graphs) != sorted(self.segments[0].graphs):
                raise ManifestError(f"segment {i} has flavours {sorted(seg.graphs)}, segment 0 has "
                                    f"{sorted(self.segments[0].graphs)}")
            expected_start = end
        steps = self.sampler.get("num_inference_steps")
        if steps != expected_start:
            raise ManifestError(f"segments cover steps 0..{expected_start} but the sampler runs {steps} steps")

    def _validate_settings(self) -> None:
        try:
            config = self.pipeline_config()
        except (TypeError, ValueError) as e:
            raise ManifestError(f"sampler settings are invalid: {e}") from e
        if config.tile_size != self.tile_latent:
            raise ManifestError(f"sampler tile_size {config.tile_size} differs from the exported tile "
                                f"{self.tile_latent}; the graphs take exactly {self.tile_latent}x{self.tile_latent}")
        missing = [k for k in TRANSFORMER_KEYS if k not in self.transformer]
        if missing:
            raise ManifestError(f"transformer settings lack {missing}")
        if self.codec.get("kind") not in ("pixel_unshuffle", "vae"):
            raise ManifestError(f"unknown codec kind {self.codec.get('kind')!r}")
        if self.codec["kind"] == "vae":
            vae_graphs(self.codec)
            if int(self.codec["latent_channels"]) != self.transformer["in_channels"]:
                raise ManifestError(f"the VAE has {self.codec['latent_channels']} latent channels, the transformer "
                                    f"takes {self.transformer['in_channels']}")


def vae_graphs(codec: dict[str, Any]) -> dict[str, FileRef]:
    """{"encoder": ref, "decoder": ref} of a "vae" codec spec, its other fields checked too."""
    if "path" in codec and "encoder" not in codec:
        raise ManifestError(f"the VAE codec names a model folder ({codec['path']!r}) instead of exported VAE graphs: "
                            f"this folder comes from an older export; export it again")
    missing = [k for k in ("encoder", "decoder", *VAE_CODEC_KEYS) if k not in codec]
    if missing:
        raise ManifestError(f"the VAE codec lacks the fields {missing}")
    try:
        refs = {part: _file_ref(codec[part]) for part in ("encoder", "decoder")}
        for key in VAE_CODEC_KEYS:
            float(codec[key])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"the VAE codec has malformed fields: {e!r}") from e
    return refs


def codec_files(codec: dict[str, Any]) -> dict[str, FileRef]:
    """The files a codec reads from the folder (the VAE graphs; none for pixel-unshuffle)."""
    return vae_graphs(codec) if codec.get("kind") == "vae" else {}


def load_codec_spec(spec: dict[str, Any], folder: Path, **session_options):
    """The codec a manifest describes: pixel-unshuffle, or the folder's VAE graphs run by onnxruntime
    (`session_options`: providers, intra_op_num_threads, see `OnnxVAECodec`)."""
    from ..models.latents import PixelUnshuffleCodec

    if spec.get("kind") == "pixel_unshuffle":
        return PixelUnshuffleCodec(factor=int(spec["factor"]), scaling=float(spec["scaling"]))
    if spec.get("kind") == "vae":
        from ..models.onnx_vae import OnnxVAECodec

        graphs = vae_graphs(spec)
        return OnnxVAECodec(graphs["encoder"].resolve(folder), graphs["decoder"].resolve(folder),
                            downsample=int(spec["downsample"]), latent_channels=int(spec["latent_channels"]),
                            scaling=float(spec["scaling"]), shift=float(spec["shift"]), tile_px=int(spec["tile_px"]),
                            overlap_px=int(spec["overlap_px"]), **session_options)
    raise ManifestError(f"unknown codec kind {spec.get('kind')!r}")
