"""Fixtures shared by the whole suite: tiny model configs, models with random weights, the shipped default.
The helpers behind them live in tests/helpers/."""
import os

import pytest
import torch

from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize

# Results must not depend on how many cores the machine has.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def micro_config() -> dict:
    return dict(MICRO_CONFIG)


@pytest.fixture
def micro_model(micro_config) -> DiT4SRTransformer2DModel:
    return randomize(DiT4SRTransformer2DModel(**micro_config)).eval()


@pytest.fixture
def engines_folder(tmp_path):
    """A tiny exported folder with stand-in engine files (tests/helpers/export_folder.py)."""
    from tests.helpers.export_folder import make_export_folder

    return make_export_folder(tmp_path / "engines", engines=True)


@pytest.fixture
def graphs_folder(tmp_path):
    """A tiny exported folder with trt graphs and no engines."""
    from tests.helpers.export_folder import make_export_folder

    return make_export_folder(tmp_path / "graphs")


@pytest.fixture(scope="session")
def default_pipeline():
    from qdit4sr.models.pipeline import load_default_pipeline

    return load_default_pipeline()
