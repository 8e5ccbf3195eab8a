"""Checkpoint folders in diffusers layout: `<folder>/transformer/{config.json, *.safetensors}`.

Loading is strict: every key must be present with the right shape, and nothing unexpected may be
left over, so a wrong or truncated checkpoint fails loudly instead of running with random layers.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write, atomic_write_text
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
        index = json.loads((folder / INDEX_NAME).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {folder}")
    return found


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            state.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshaped key."""
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


def load_transformer(path: str | os.PathLike, subfolder: str | None = "transformer",
                     dtype: torch.dtype = torch.float32, **config_overrides) -> DiT4SRTransformer2DModel:
    """Build the model from config.json on the meta device, then assign the strictly checked weights."""
    folder = _transformer_dir(path, subfolder)
    config = read_config(folder, **config_overrides)
    try:
        with torch.device("meta"):
            model = DiT4SRTransformer2DModel(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid config in {folder / 'config.json'}: {e}") from e
    state = read_state_dict(folder)
    check_state_dict(model, state)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
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
