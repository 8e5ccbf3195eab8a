"""Bundled photos (no downloads), the x4 degradation, and image metrics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Photos shipped inside scikit-image, scikit-learn, matplotlib and PyWavelets. The held-out ones are
# never used for training or calibration, only for evaluation.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "china",
                "present", "colorwheel", "camera", "coins", "brick", "grass", "gravel", "moon", "cell", "page",
                "text")
HELD_OUT_PHOTOS = ("chelsea", "flower", "grace_hopper", "clock", "aero", "ascent")
# Bundled files outside scikit-image: name -> (package, file).
_MATPLOTLIB_PHOTOS = {"grace_hopper": "grace_hopper.jpg", "present": "Minduka_Present_Blue_Pack.png"}
_PYWT_PHOTOS = ("aero", "ascent")


def load_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo [H, W, 3] by name; grayscale photos are replicated to three channels."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name in _MATPLOTLIB_PHOTOS:
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data(_MATPLOTLIB_PHOTOS[name]) as f:
            image = np.asarray(Image.open(f).convert("RGB"))
    elif name in _PYWT_PHOTOS:
        import pywt.data

        image = getattr(pywt.data, name)()
    else:
        import skimage.data

        if not hasattr(skimage.data, name):
            raise ValueError(f"unknown bundled photo {name!r}")
        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [0, 1]."""
    # A copy: images from PIL are read-only views, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float [1, 3, H, W] in [0, 1] -> uint8 [H, W, 3] (rounded, clipped)."""
    return (image[0].clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).numpy()


def resize_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing when shrinking, as the x4 degradation and the LR upsampling use.

    Computed in float64 and rounded to the input dtype: torch's float32 kernel rounds differently on
    CPUs with and without FMA (its AVX2/AVX512 builds contract multiply-adds, the baseline build does
    not), so float32 results depend on the machine; in float64 those differences vanish in the final
    rounding, which makes the result reproducible, also by the C++ runtime.
    """
    antialias = height < image.shape[-2] or width < image.shape[-1]
    out = F.interpolate(image.double(), size=(height, width), mode="bicubic", align_corners=False,
                        antialias=antialias)
    return out.clamp(0, 1).to(image.dtype)


def fit_short_side(image: torch.Tensor, side: int) -> tuple[torch.Tensor, bool]:
    """image [1, 3, H, W] enlarged (bicubic, aspect kept) so its short side is at least `side`; and whether it was."""
    h, w = image.shape[-2:]
    if min(h, w) >= side:
        return image, False
    factor = side / min(h, w)
    return resize_bicubic(image, max(side, round(h * factor)), max(side, round(w * factor))), True


def degrade_x4(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """HR [B, 3, H, W] -> LR [B, 3, H/scale, W/scale] (antialiased bicubic)."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {scale}")
    return resize_bicubic(hr, h // scale, w // scale)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


# -- reading the user's images ---------------------------------------------------------------------------

SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
UNSUPPORTED_HINT = "use an 8-bit RGB or greyscale image (RGBA is composited on white, 16-bit greyscale scaled to 8 bits)"


def to_rgb8(im) -> tuple[np.ndarray, list[str]]:
    """A PIL image as RGB uint8 [H, W, 3], and one note for each conversion that changed what it shows.

    RGB, greyscale (8-bit, 1-bit) and palette images convert as they are. Transparency (an alpha
    channel, or a palette's transparent colour) is composited on white, with a note when any pixel is
    not fully opaque. 16-bit greyscale is scaled to 8 bits (v * 255 / 65535, rounded), with a note.
    Other modes (CMYK, YCbCr, 32-bit integer or float, ...) raise a one-line ValueError.
    """
    from PIL import Image

    notes: list[str] = []
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGB", "L", "1", "P"):
        return np.asarray(im.convert("RGB")), notes
    if mode in WITH_ALPHA:
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            notes.append(f"{mode} image with transparency: composited on a white background "
                         f"({int((alpha < 255).sum())} of {alpha.size} pixels were not fully opaque)")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), notes
    if mode in SIXTEEN_BIT_GREY:
        values = np.asarray(im).astype(np.float64)
        grey = np.round(values * (255.0 / 65535.0)).astype(np.uint8)
        notes.append("16-bit greyscale image: scaled to 8 bits (the model works on 8-bit RGB)")
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), notes
    raise ValueError(f"image mode {mode} is not supported; {UNSUPPORTED_HINT}")


def read_image_rgb8(path) -> tuple[np.ndarray, list[str]]:
    """The image file at `path` as RGB uint8 [H, W, 3] and the conversion notes of `to_rgb8`.

    Raises ValueError (one line) for a file that is not a readable image or has an unsupported mode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from e
