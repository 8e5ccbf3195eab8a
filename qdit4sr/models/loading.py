"""Checkpoint folders in diffusers layout: `<folder>/transformer/{config.json, *.safetensors}`.

Loading is strict: every key must be present with the right shape, and nothing unexpected may be
left over, so a wrong or truncated checkpoint fails loudly instead of running with random layers.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ..fileio import atomic_write, atomic_write_text
from .safetensors_reader import SafetensorsFormatError, TensorEntry, iter_tensors, read_header, read_tensor
from .transformer import DiT4SRTransformer2DModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_CONFIG_KEYS = set(inspect.signature(DiT4SRTransformer2DModel.__init__).parameters) - {"self"}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as a DiT4SR transformer."""


def _transformer_dir(path: str | os.PathLike, subfolder: str | None) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist")
    if subfolder:
        folder = folder / subfolder
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in {folder}")
    return folder


def read_config(folder: Path, **overrides) -> dict:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON: {e}") from e
    # diffusers writes bookkeeping keys (_class_name, _diffusers_version); keep only constructor arguments.
    config = {k: v for k, v in raw.items() if k in _CONFIG_KEYS}
    config.update(overrides)
    return config


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).is_file():
        try:
            index = json.loads((folder / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{folder / INDEX_NAME} is not a valid weight index: {e!r}") from e
        return [folder / name for name in names]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {folder}")
    return found


def checkpoint_entries(folder: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """Name -> (file, entry) for every tensor of the checkpoint, from the file headers alone."""
    entries: dict[str, tuple[Path, TensorEntry]] = {}
    for file in _weight_files(folder):
        try:
            header = read_header(file)
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
        for name, entry in header.items():
            if name in entries:
                raise CheckpointError(f"{name} is stored twice ({entries[name][0].name} and {file.name})")
            entries[name] = (file, entry)
    return entries


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, as stored (for small models and tools; loading streams instead)."""
    state: dict[str, torch.Tensor] = {}
    for name, (file, entry) in checkpoint_entries(folder).items():
        try:
            state[name] = read_tensor(file, entry)
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return state


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshaped key (values need only `.shape`)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("misshaped keys", misshaped)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError("checkpoint does not match the DiT4SR config; " + "; ".join(parts))


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`, as load_state_dict(assign=True) does."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def load_transformer(path: str | os.PathLike, subfolder: str | None = "transformer",
                     dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                     **config_overrides) -> DiT4SRTransformer2DModel:
    """Build the model from config.json on the meta device, then fill it with the strictly checked weights.

    The shapes are checked from the file headers before any weight is read. Tensors are then read one
    at a time straight into their final dtype (None: as stored) and device, through a small staging
    buffer when converting: loading needs the model's memory plus a few MB, never a second copy.
    """
    folder = _transformer_dir(path, subfolder)
    config = read_config(folder, **config_overrides)
    try:
        with torch.device("meta"):
            model = DiT4SRTransformer2DModel(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid config in {folder / 'config.json'}: {e}") from e
    entries = checkpoint_entries(folder)
    check_state_dict(model, {name: entry for name, (_, entry) in entries.items()})
    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in entries.items():
        by_file.setdefault(file, []).append(name)
    convert = (lambda e: dtype if e.dtype.is_floating_point else None) if dtype is not None else None
    for file, names in by_file.items():
        try:
            for name, tensor in iter_tensors(file, names, dtype_of=convert, device=device):
                _assign(model, name, tensor)
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # non-persistent buffers are not in checkpoints; this model has none, keep it that way
        raise CheckpointError(f"{len(left)} tensors were not filled by the checkpoint, e.g. {left[:3]}")
    return model.eval()


def save_transformer(model: DiT4SRTransformer2DModel, path: str | os.PathLike, subfolder: str | None = "transformer",
                     dtype: torch.dtype | None = None) -> Path:
    """Write config.json and the safetensors weights; files appear only once complete."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()
              if not k.startswith("_")}
    config["_class_name"] = "DiT4SRTransformer2DModel"
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder
