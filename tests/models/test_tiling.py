import pytest
import torch

from qdit4sr.models.tiling import gaussian_weights, tile_starts, tile_windows


@pytest.mark.parametrize("length,tile,overlap", [(16, 16, 6), (40, 16, 6), (37, 16, 6), (128, 64, 24), (10, 16, 6)])
def test_tiles_cover_with_required_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and (length <= tile or starts[-1] == length - tile)
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap


def test_windows_and_weights():
    assert len(tile_windows(40, 16, 16, 6)) == 4 * 1
    w = gaussian_weights(16, 16)
    assert w.shape == (16, 16) and (w > 0).all()
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.T)


def test_bad_tiling_arguments():
    with pytest.raises(ValueError):
        tile_starts(10, 8, 8)
