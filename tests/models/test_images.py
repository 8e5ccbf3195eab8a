"""Reading the user's images: which modes convert, how, and what is said about it."""
import numpy as np
import pytest
from PIL import Image

from qdit4sr.models.images import read_image_rgb8, to_rgb8


def test_rgb_and_greyscale_pass_unchanged():
    rgb = (np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8)
    out, notes = to_rgb8(Image.fromarray(rgb))
    assert np.array_equal(out, rgb) and notes == []
    grey = rgb[..., 0]
    out, notes = to_rgb8(Image.fromarray(grey))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=2)) and notes == []


def test_alpha_is_composited_on_white_with_a_note():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[..., 3] = [[0], [64], [128], [255]]
    out, notes = to_rgb8(Image.fromarray(rgba, "RGBA"))
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.round(rgba[..., :3] * a + 255 * (1 - a))
    assert np.abs(out.astype(np.float64) - expected).max() <= 1   # PIL's integer blend rounds
    assert np.array_equal(out[3], rgba[3, :, :3]) and np.all(out[0] == 255)
    assert len(notes) == 1 and "composited on a white background" in notes[0] and "12 of 16" in notes[0]


def test_opaque_alpha_is_dropped_silently():
    rgba = np.full((3, 3, 4), 255, np.uint8)
    rgba[..., 0] = 7
    out, notes = to_rgb8(Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(out, rgba[..., :3]) and notes == []


def test_sixteen_bit_greyscale_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out, notes = read_image_rgb8(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert len(notes) == 1 and "16-bit greyscale" in notes[0] and "8 bits" in notes[0]


def test_unsupported_modes_and_unreadable_files(tmp_path):
    Image.new("CMYK", (4, 4)).save(tmp_path / "c.jpg")
    with pytest.raises(ValueError, match="mode CMYK is not supported; use an 8-bit RGB or greyscale"):
        read_image_rgb8(tmp_path / "c.jpg")
    with pytest.raises(ValueError, match="mode F"):
        to_rgb8(Image.new("F", (4, 4)))
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image_rgb8(tmp_path / "x.png")
