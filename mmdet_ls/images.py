"""Decode untrusted image bytes into the array the detector expects."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

# Larger than any camera photo, small enough that one image cannot take the
# replica's memory (100 MP of RGB is 300 MB).
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_SIDE = 20_000
# Raster formats a browser (and so Label Studio's <Image>) can show, plus
# TIFF; JPEG covers multi-picture (MPO) files. Everything else Pillow knows
# (EPS runs Ghostscript, PSD, FITS, ...) is refused before a plugin parses it.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "ICO")


class ImageDecodeError(ValueError):
    """The bytes are not an image this backend can read (message for the user)."""


@dataclass
class DecodedImage:
    """BGR uint8 array (mmdet's convention) in display orientation."""

    bgr: np.ndarray
    width: int
    height: int
    exif_transposed: bool = False
    source: str = ""  # where the bytes came from: local, label_studio, remote, inline
    timings: dict[str, float] = field(default_factory=dict)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit-depth grey: stretch the real range into 8 bits instead of
        # clipping (PIL's convert("L") saturates everything above 255).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite over white, as Label Studio's canvas shows transparency.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
) -> DecodedImage:
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data" and the like: the log is no place for them
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            if width > max_side or height > max_side:
                raise ImageDecodeError(
                    f"image is {width}x{height} px; the largest side allowed is {max_side} px"
                )
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} px ({width * height / 1e6:.0f} MP); at most "
                    f"{max_pixels / 1e6:.0f} MP allowed"
                )
            img.seek(0)  # animated images: the first frame is what Label Studio shows
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "data is not an image in a supported format (JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF, ICO)"
        ) from None
    except MemoryError:
        raise ImageDecodeError("image is too large to decode in the memory available") from None
    except Exception as exc:
        # Pillow reports truncated or corrupt files as OSError ("image file is
        # truncated"); fuzzed files also raise SyntaxError, struct.error,
        # IndexError, ZeroDivisionError... all of them mean a broken file.
        raise ImageDecodeError(f"image data is corrupt or truncated: {_short(exc)}") from None

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: browsers ignore it, so do we
        orientation = 1
    try:
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    except MemoryError:
        raise ImageDecodeError("image is too large to decode in the memory available") from None
    except Exception as exc:  # e.g. a colour mode Pillow cannot convert to RGB (LAB TIFF)
        raise ImageDecodeError(f"image mode {img.mode} cannot be converted to RGB: {_short(exc)}") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    bgr = np.ascontiguousarray(arr[:, :, ::-1])
    return DecodedImage(bgr=bgr, width=rgb.width, height=rgb.height, exif_transposed=orientation not in (None, 1))
