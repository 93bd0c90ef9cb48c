"""Decoding one image file robustly to uint8 RGB, and the ADM centre crop.

Every file either becomes an RGB uint8 array or raises `BadImage` with a reason a person can act on;
nothing in between (no silently grey bottoms from truncated JPEGs, no white squares from 16-bit PNGs
pushed through an 8-bit conversion). The conversions applied are returned so that the prepare
report can count them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Modes that carry 16 (or more) bits per sample in one integer channel: PNG/TIFF 16-bit greyscale.
WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
WHITE = (255, 255, 255)


class BadImage(Exception):
    """A file that cannot become an image; `reason` says why (e.g. 'truncated: image file is truncated')."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _has_alpha(img: Image.Image) -> bool:
    # a palette or RGB/L image can carry a transparency key (PNG tRNS) instead of an alpha channel
    return img.mode in ALPHA_MODES or "transparency" in img.info


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL mode -> 'RGB'. Returns the image and the conversions applied (names for the report).

    Transparency is composited over white: the colour under fully transparent pixels is undefined
    (often black), so dropping alpha as ADM's convert('RGB') does would expose it.
    """
    conversions: list[str] = []
    if img.mode in WIDE_INT_MODES:
        # I;16 -> 'RGB' through PIL clips at 255 (a mostly white image); rescale the full 16-bit range.
        arr = np.asarray(img).astype(np.float64)  # [H, W]
        if arr.min() < 0 or arr.max() > 65535:
            raise BadImage(f"mode {img.mode} with values outside 0..65535 (min {arr.min():.0f}, max {arr.max():.0f})")
        grey = np.rint(arr / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB"), [f"{img.mode}->RGB (16-bit rescaled)"]
    if img.mode == "F":
        raise BadImage("32-bit float image (mode F): its value range is unknown; convert it to 8-bit first")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema() == (255, 255):  # fully opaque (many tools write RGBA): nothing to lay on
            # white; an RGBA file is RGB as it is, a grey or palette one is still converted
            return rgba.convert("RGB"), [] if img.mode == "RGBA" else [f"{img.mode}->RGB"]
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        conversions.append(f"{img.mode}+alpha->RGB (composited on white)")
        return Image.alpha_composite(background, rgba).convert("RGB"), conversions
    if img.mode != "RGB":
        conversions.append(f"{img.mode}->RGB")
        img = img.convert("RGB")
    return img, conversions


def load_rgb(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Decode a file to uint8 [H, W, 3] RGB in its upright orientation; raise BadImage with a reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("file does not exist") from None
    except OSError as e:
        raise BadImage(f"cannot stat: {e}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* (89M-179M pixels) is a large but valid photo; the hard limit
            # above that still raises and is reported below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decoding happens here: truncated data raises OSError now, not later
                orientation = _exif_orientation(img)
                conversions = [f"EXIF orientation {orientation} applied"] if orientation not in (None, 1) else []
                upright = ImageOps.exif_transpose(img)
                rgb, more = to_rgb(upright)
                arr = np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", "broken data stream"),
        # and some plugins as SyntaxError/ValueError.
        raise BadImage(f"corrupt or truncated: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"decoded to an unexpected shape {arr.shape}")
    return arr, conversions + more


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)  # the Orientation tag
    except Exception:  # malformed EXIF: exif_transpose already ignored it
        return None


def adm_center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """ADM (guided-diffusion `center_crop_arr`) crop of uint8 [H, W, 3] with min(H, W) >= size -> [size, size, 3].

    Repeated BOX halving while the short side is >= 2*size (cheap anti-aliasing), one BICUBIC resize so the
    short side equals `size`, then the centre crop. Bit-identical to the reference for the same PIL.
    """
    if min(arr.shape[:2]) < size:
        raise ValueError(f"adm_center_crop needs a short side >= {size}, got {arr.shape[:2]}; upsample small images instead")
    img = Image.fromarray(arr)
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    out = np.asarray(img)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return np.ascontiguousarray(out[top : top + size, left : left + size])


def upsample_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The (H, W) an image smaller than `size` is resized to before its centre crop (ADM's rounding)."""
    scale = size / min(height, width)
    return round(height * scale), round(width * scale)
