"""Decode untrusted image bytes into the array the detector expects."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

# Larger than any camera photo, small enough that one image cannot take the
# replica's memory (100 MP of RGB is 300 MB).
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_SIDE = 20_000
# Peak memory one decode may use (see decode_peak_bytes). A max_pixels RGB
# photo needs about 800 MB (Pillow keeps RGB in 4 bytes/px, plus room for an
# EXIF rotation, plus the 3 bytes/px BGR result), so it must fit.
DEFAULT_MAX_DECODE_BYTES = 1 << 30
# Raster formats a browser (and so Label Studio's <Image>) can show, plus
# TIFF; JPEG covers multi-picture (MPO) files. Everything else Pillow knows
# (EPS runs Ghostscript, PSD, FITS, ...) is refused before a plugin parses it.
# No ICO: Pillow's ICO plugin decodes its largest frame inside Image.open,
# before any size check could run (and an embedded PNG can be any size).
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF")
UNSUPPORTED_FORMAT_MESSAGE = "data is not an image in a supported format (JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF)"

# Set once here, not per call: warnings.catch_warnings() swaps the process-wide
# filter list and is not thread-safe. Pillow's own pixel limit is a backstop
# (DecompressionBombError above 2x this, raised inside Image.open); our
# explicit checks below run before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# Between 1x and 2x Pillow only warns; max_pixels decides, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# "Corrupt EXIF data", "Tag data larger than file", ...: about the user's file,
# and the log is no place for them.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")

# Bytes per pixel of Pillow's in-memory storage; every other mode (RGB
# included) takes 4.
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_HIGH_DEPTH_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Pixels converted at a time: bounds the conversion's temporaries.
_STRIP_PIXELS = 1 << 17
# Per strip pixel: crop (4) + RGBA, background, composite, RGB (4 each) +
# numpy's copy via tobytes (2 x 3), or the float64 stretch (2 x 8); doubled
# for allocator slack.
_STRIP_WORK_BYTES_PER_PIXEL = 64
_MIB = 1 << 20


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


def _decoder_bytes(img: Image.Image, pixels: int, storage: int) -> int:
    """Buffers the format's decoder holds besides the image itself (header only)."""
    fmt = img.format
    codec = img.tile[0][0] if img.tile else ""
    if fmt in ("JPEG", "MPO"):
        # Progressive JPEG: libjpeg keeps every DCT coefficient (2 bytes per
        # sample) until the last scan.
        if img.info.get("progressive") or img.info.get("progression"):
            return pixels * 2 * len(img.getbands())
        return 0
    if fmt == "WEBP":
        # libwebp's animation decoder keeps two RGBA canvases for the image's
        # lifetime, and Pillow copies the frame out as bytes.
        return pixels * 12
    if fmt == "AVIF":
        # libavif keeps the YUV(A) planes (up to 4 x 16-bit), and Pillow
        # copies the RGB(A) frame out as bytes.
        return pixels * 12
    if fmt == "GIF":
        return pixels * storage  # frame-0 disposal buffer
    if codec == "bmp_rle":
        return pixels * 3  # Python bytearray (with growth slack) + bytes copy
    if codec == "libtiff":
        return _tiff_block_bytes(img, pixels)
    return 0


def _tiff_block_bytes(img: Image.Image, pixels: int) -> int:
    # libtiff decodes one strip or tile at a time into a buffer of its own;
    # a single strip can be the whole image.
    try:
        tags = img.tag_v2  # type: ignore[attr-defined]
        spp = int(tags.get(277, 1))
        bits = tuple(int(b) for b in tags.get(258, (1,)))
        if len(bits) < spp:
            bits = bits[:1] * spp
        per_px = max(4, math.ceil(sum(bits[:spp]) / 8))  # YCbCr goes through RGBA
        width, height = img.size
        if 322 in tags and 323 in tags:
            block = int(tags[322]) * int(tags[323])
        else:
            block = width * min(height, int(tags.get(278, height)))
        return max(1, block) * per_px
    except Exception:
        return pixels * 8  # unreadable tags: assume one strip of 4 x 16-bit samples


def decode_peak_bytes(img: Image.Image) -> int:
    """Estimated peak memory of decode_image for an opened, not yet loaded image.

    The decoded image (Pillow's bytes per pixel for its mode) and the decoder's
    own buffers, plus the larger of a second image (EXIF rotation copies it)
    and the BGR uint8 result (3 bytes/px), plus one strip's conversion work.
    """
    width, height = img.size
    pixels = width * height
    storage = _STORAGE_BYTES.get(img.mode, 4)
    strip_work = max(_STRIP_PIXELS, width) * _STRIP_WORK_BYTES_PER_PIXEL
    return pixels * (storage + max(storage, 3)) + _decoder_bytes(img, pixels, storage) + strip_work


def _strips(width: int, height: int):
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield (0, top, width, min(height, top + rows))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite over white, as Label Studio's canvas shows transparency.
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_bgr(img: Image.Image) -> np.ndarray:
    """The image as a contiguous BGR uint8 array, converted a strip of rows at a
    time so no whole-image intermediate (RGB copy, float64 array) exists."""
    width, height = img.size
    bgr = np.empty((height, width, 3), dtype=np.uint8)
    if img.mode in _HIGH_DEPTH_GREY:
        # High bit-depth grey: stretch the real range into 8 bits instead of
        # clipping (PIL's convert("L") saturates everything above 255). Same
        # float64 formula as on the whole image, but per strip.
        lows, highs = [], []
        for box in _strips(width, height):
            native = np.asarray(img.crop(box))
            lows.append(native.min())
            highs.append(native.max())
        lo, hi = float(np.min(lows)), float(np.max(highs))  # np.min: NaN wins, as before
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        for box in _strips(width, height):
            grey = np.asarray(img.crop(box)).astype(np.float64)
            grey -= lo
            grey *= scale
            np.clip(grey, 0, 255, out=grey)
            bgr[box[1] : box[3]] = grey.astype(np.uint8)[:, :, None]
        return bgr
    for box in _strips(width, height):
        bgr[box[1] : box[3]] = np.asarray(_to_rgb(img.crop(box)), dtype=np.uint8)[:, :, ::-1]
    return bgr


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> DecodedImage:
    """Decode `data` (untrusted) into a BGR uint8 array in display orientation.

    Refused with ImageDecodeError, after Image.open has read only the header
    and before any pixel is decoded: formats outside SUPPORTED_FORMATS, a side
    over `max_side`, more than `max_pixels` pixels, and images whose estimated
    peak memory (decode_peak_bytes: decoded pixels in the file's mode, decoder
    buffers, EXIF rotation, the BGR result) exceeds `max_decode_bytes` bytes;
    the byte budget is what stops a small 16-bit or alpha file from costing
    far more than its pixel count suggests.
    """
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    try:
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
        needed = decode_peak_bytes(img)
        if needed > max_decode_bytes:
            raise ImageDecodeError(
                f"image {width}x{height} in mode {img.mode} needs about {math.ceil(needed / _MIB)} MiB "
                f"to decode; at most {max_decode_bytes // _MIB} MiB allowed"
            )
        img.seek(0)  # animated images: the first frame is what Label Studio shows
        img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives as an exception if someone turned warnings into errors.
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(UNSUPPORTED_FORMAT_MESSAGE) from None
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
            img = ImageOps.exif_transpose(img)  # rebinding frees the unrotated copy
        bgr = _to_bgr(img)
    except MemoryError:
        raise ImageDecodeError("image is too large to decode in the memory available") from None
    except Exception as exc:  # e.g. a colour mode Pillow cannot convert to RGB (LAB TIFF)
        raise ImageDecodeError(f"image mode {img.mode} cannot be converted to RGB: {_short(exc)}") from None
    return DecodedImage(bgr=bgr, width=bgr.shape[1], height=bgr.shape[0], exif_transposed=orientation not in (None, 1))
