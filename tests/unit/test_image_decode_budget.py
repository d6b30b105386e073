"""decode_image under hostile sizes: byte budget, no pixel decoding before the
size checks (every supported format), bounded conversion memory, thread-safe
warning handling."""
import functools
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from mmdet_ls import images
from mmdet_ls.images import (
    SUPPORTED_FORMATS,
    UNSUPPORTED_FORMAT_MESSAGE,
    ImageDecodeError,
    decode_image,
    decode_peak_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def ico_with_png(png: bytes) -> bytes:
    """One-entry ICO whose directory says 256x256 but whose PNG is any size."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def gradient_rgb(width: int, height: int) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


# Big enough to be over max_pixels=1_000_000 and over an 8 MiB byte budget.
BIG = (2000, 1500)
ENCODERS = {
    "JPEG": lambda img: encode(img, "JPEG", quality=80),
    "PNG": lambda img: encode(img, "PNG"),
    "GIF": lambda img: encode(img.convert("P"), "GIF"),
    "BMP": lambda img: encode(img, "BMP"),
    "TIFF": lambda img: encode(img, "TIFF", compression="tiff_lzw"),
    "WEBP": lambda img: encode(img, "WEBP", quality=50),
    "AVIF": lambda img: encode(img, "AVIF", speed=10, quality=30),
    "ICO": lambda img: ico_with_png(encode(img, "PNG")),
}


@functools.cache
def big_image(fmt: str) -> bytes:
    if fmt not in ENCODERS:
        pytest.fail(f"no test encoder for supported format {fmt}: add one to ENCODERS")
    if fmt in ("WEBP", "AVIF") and not features.check(fmt.lower()):
        pytest.skip(f"this Pillow build has no {fmt} support, so it cannot write a {fmt} test image")
    return ENCODERS[fmt](gradient_rgb(*BIG))


@pytest.fixture
def pixel_loads(monkeypatch):
    """Records every entry into pixel decoding: each plugin's own load(), the
    base load()s, and Pillow's decoder factory."""
    calls = []

    def record(cls):
        original = cls.__dict__["load"]

        def load(self, *args, **kwargs):
            calls.append(f"{type(self).__name__}.load")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "load", load)

    Image.init()
    classes = {Image.Image, ImageFile.ImageFile}
    classes |= {factory for factory, _ in Image.OPEN.values() if isinstance(factory, type)}
    from PIL import JpegImagePlugin, MpoImagePlugin  # JPEG's factory is a function

    classes |= {JpegImagePlugin.JpegImageFile, MpoImagePlugin.MpoImageFile}
    for cls in classes:
        if "load" in cls.__dict__:
            record(cls)
    getdecoder = Image._getdecoder

    def recording_getdecoder(*args, **kwargs):
        calls.append("Image._getdecoder")
        return getdecoder(*args, **kwargs)

    monkeypatch.setattr(Image, "_getdecoder", recording_getdecoder)
    return calls


# --- no format decodes before the size checks ---------------------------------


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_every_supported_format_is_refused_before_any_pixel_is_decoded(fmt, pixel_loads):
    data = big_image(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt
    pixel_loads.clear()  # encoding the test image decodes too
    with pytest.raises(ImageDecodeError, match=r"MP\); at most 1 MP allowed"):
        decode_image(data, max_pixels=1_000_000)
    assert pixel_loads == [], f"{fmt}: pixels decoded before the max_pixels check"
    with pytest.raises(ImageDecodeError, match="needs about .* MiB to decode; at most 8 MiB allowed"):
        decode_image(data, max_decode_bytes=8 * MIB)
    assert pixel_loads == [], f"{fmt}: pixels decoded before the byte-budget check"
    # The recorder does see decoding, and the file really is a valid image in fmt.
    out = decode_image(data)
    assert (out.width, out.height) == BIG and pixel_loads


def test_ico_is_refused_as_unsupported_without_decoding(pixel_loads):
    assert "ICO" not in SUPPORTED_FORMATS
    data = big_image("ICO")
    pixel_loads.clear()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert str(info.value) == UNSUPPORTED_FORMAT_MESSAGE
    assert "ICO" not in UNSUPPORTED_FORMAT_MESSAGE
    assert pixel_loads == []


@pytest.mark.filterwarnings("ignore:Image was not the expected size")
def test_ico_would_fail_the_per_format_check(pixel_loads, monkeypatch):
    # Why ICO is out: its Image.open decodes the embedded PNG, whatever its size.
    data = big_image("ICO")
    pixel_loads.clear()
    img = Image.open(io.BytesIO(data), formats=("ICO",))
    assert img.size == BIG and pixel_loads
    pixel_loads.clear()
    monkeypatch.setattr(images, "SUPPORTED_FORMATS", SUPPORTED_FORMATS + ("ICO",))
    with pytest.raises(ImageDecodeError, match="at most 1 MP allowed"):
        decode_image(data, max_pixels=1_000_000)
    assert pixel_loads, "refused, but only after decoding every pixel"


# --- byte budget ---------------------------------------------------------------

BOMB_SIDE = 10_000


@functools.cache
def grey16_bomb() -> bytes:
    """10000x10000 I;16 PNG, almost all zeros: a few hundred KiB on the wire,
    2 GiB for the old float64 stretch."""
    img = Image.new("I;16", (BOMB_SIDE, BOMB_SIDE), 0)
    img.paste(Image.fromarray(np.full((200, 200), 40000, dtype=np.uint16)), (100, 200))  # paste(40000) mangles I;16
    img.putpixel((BOMB_SIDE - 1, BOMB_SIDE - 1), 65535)
    data = encode(img, "PNG")
    assert len(data) < 600 * 1024
    return data


def test_small_16_bit_png_over_the_byte_budget_is_refused_before_decoding(pixel_loads):
    data = grey16_bomb()
    pixel_loads.clear()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_decode_bytes=256 * MIB)
    assert pixel_loads == []
    assert str(info.value).startswith(f"image {BOMB_SIDE}x{BOMB_SIDE} in mode I;16 needs about ")
    assert str(info.value).endswith(" MiB to decode; at most 256 MiB allowed")
    needed = int(str(info.value).split("needs about ")[1].split(" MiB")[0])
    assert needed * MIB >= decode_peak_bytes(Image.open(io.BytesIO(data))) > needed * MIB - MIB
    # 2 B/px decoded + 3 B/px BGR is the floor; the estimate must not be below it.
    assert needed >= BOMB_SIDE * BOMB_SIDE * 5 / MIB


def run_measured(path: Path, extra: str = "") -> dict:
    """Decode `path` in a fresh interpreter; report the growth of peak RSS
    (Pillow's allocations included) and the header estimate."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak RSS")
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across vfork+exec.
    code = textwrap.dedent(
        f"""
        import gc, io, json, sys
        from PIL import Image
        from mmdet_ls.images import decode_image, decode_peak_bytes
        def hwm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        data = open({str(path)!r}, "rb").read()
        img = Image.open(io.BytesIO(data))
        estimate = decode_peak_bytes(img)
        warm = io.BytesIO()
        img.resize((8, 8)).save(warm, img.format)  # first use imports plugins and codecs
        decode_image(warm.getvalue())
        del img, warm
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        before = hwm()
        out = decode_image(data)
        peak = hwm()
        result = dict(used=peak - before, estimate=estimate, size=[out.width, out.height])
        {extra}
        print(json.dumps(result))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_small_16_bit_png_decodes_within_default_budget_in_bounded_memory(tmp_path):
    # The default budget (1 GiB) admits this image: with the strip-wise
    # stretch it costs ~5 B/px (decoded 2 + BGR 3), not the old ~26 B/px.
    path = tmp_path / "bomb.png"
    path.write_bytes(grey16_bomb())
    r = run_measured(
        path,
        extra="result['values'] = [int(out.bgr[0, 0, 0]), int(out.bgr[250, 150, 1]), "
        "int(out.bgr[-1, -1, 2]), bool((out.bgr[:, :, 0] == out.bgr[:, :, 2]).all())]",
    )
    pixels = BOMB_SIDE * BOMB_SIDE
    assert r["size"] == [BOMB_SIDE, BOMB_SIDE]
    assert r["values"] == [0, int(40000 * 255.0 / 65535), 255, True]  # old formula: 155
    assert r["estimate"] <= images.DEFAULT_MAX_DECODE_BYTES
    assert r["used"] <= r["estimate"], r
    assert r["used"] <= pixels * (2 + 3) + 128 * MIB, r


def _measured_cases():
    rgb = gradient_rgb(1500, 1500)
    noise = np.random.default_rng(1).integers(0, 65535, (1500, 1500), dtype=np.uint16)
    transparent_p = rgb.convert("P")
    cases = {
        "jpeg": lambda: encode(rgb, "JPEG"),
        "jpeg-progressive-444": lambda: encode(rgb, "JPEG", progressive=True, subsampling=0),
        "png-rgba": lambda: encode(rgb.convert("RGBA"), "PNG"),
        "png-la": lambda: encode(rgb.convert("LA"), "PNG"),
        "png-p-transparency": lambda: encode(transparent_p, "PNG", transparency=0),
        "png-i16": lambda: encode(Image.fromarray(noise), "PNG", compress_level=1),
        "gif": lambda: encode(rgb.convert("P"), "GIF"),
        "bmp": lambda: encode(rgb, "BMP"),
        "tiff-float-one-strip": lambda: encode(
            Image.fromarray(noise.astype(np.float32)), "TIFF", compression="tiff_adobe_deflate", strip_size=1 << 40
        ),
        "webp-lossless": lambda: encode(rgb, "WEBP", lossless=True, method=0),
        "avif": lambda: encode(rgb, "AVIF", speed=10),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_measured_cases()))
def test_header_estimate_is_an_upper_bound_of_the_real_peak(case, tmp_path):
    if case.startswith(("webp", "avif")) and not features.check(case.split("-")[0]):
        pytest.skip(f"this Pillow build cannot write {case}")
    path = tmp_path / case
    path.write_bytes(_measured_cases()[case]())
    r = run_measured(path)
    pixels = 1500 * 1500
    assert r["used"] >= pixels * 3, f"measurement missed the BGR result itself: {r}"
    assert r["used"] <= r["estimate"], f"{case}: estimate below the measured peak: {r}"


# --- the 16-bit stretch: same result, no whole-image float64 -------------------


def old_stretch(arr: np.ndarray) -> np.ndarray:
    """The stretch decode_image used before (float64 of the whole image)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((arr - lo) * scale).clip(0, 255).astype(np.uint8)


def test_16_bit_4000_square_decodes_in_bounded_numpy_memory_and_matches_old_formula():
    rng = np.random.default_rng(7)
    src = rng.integers(1000, 50000, (4000, 4000), dtype=np.uint16)
    data = encode(Image.fromarray(src), "PNG", compress_level=1)
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    pixels = 4000 * 4000
    # numpy and bytes allocations are traced, Pillow's are not. Old code: a
    # float64 copy plus temporaries, ~26 B/px.
    assert peak <= pixels * (2 + 1 + 3 + 3) + 16 * MIB, peak
    # In fact: the BGR result plus one strip's temporaries.
    assert peak <= pixels * 3 + 16 * MIB, peak
    expected = old_stretch(src)
    for channel in range(3):
        assert np.array_equal(out.bgr[:, :, channel], expected)


@pytest.mark.parametrize(
    "mode, dtype, fmt",
    [("I;16", np.uint16, "PNG"), ("I;16B", ">u2", "TIFF"), ("I", np.int32, "TIFF"), ("F", np.float32, "TIFF")],
)
def test_stretch_matches_old_formula_across_strip_boundaries(mode, dtype, fmt, monkeypatch):
    monkeypatch.setattr(images, "_STRIP_PIXELS", 37)  # many strips, ragged edges
    rng = np.random.default_rng(3)
    src = (rng.random((29, 41)) * 60000 - (20000 if mode in ("I", "F") else 0)).astype(dtype)
    src[5, 7] = src.max() + 1  # extremes in different strips
    src[27, 3] = src.min() - 1
    img = Image.frombytes(mode, src.shape[::-1], src.tobytes()) if mode == "I;16B" else Image.fromarray(src)
    assert img.mode == mode
    decoded = Image.open(io.BytesIO(encode(img, fmt)))
    assert decoded.mode == mode
    out = decode_image(encode(img, fmt))
    assert np.array_equal(out.bgr[:, :, 1], old_stretch(np.asarray(decoded)))


def old_to_bgr(data: bytes) -> np.ndarray:
    """decode_image's whole-image conversion before strips (reference)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        rgb = Image.fromarray(old_stretch(np.asarray(img)), "L").convert("RGB")
    else:
        if mode == "P" and "transparency" in img.info:
            img, mode = img.convert("RGBA"), "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
        else:
            rgb = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])


def _mode_samples():
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (23, 31, 4), dtype=np.uint8))
    rgb = rgba.convert("RGB")
    pal = rgb.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "RGB": encode(rgb, "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "LA": encode(rgba.convert("LA"), "PNG"),
        "L": encode(rgb.convert("L"), "PNG"),
        "1": encode(rgb.convert("1"), "PNG"),
        "P": encode(pal, "PNG"),
        "P+transparency": encode(pal, "PNG", transparency=3),
        "CMYK": encode(rgb.convert("CMYK"), "TIFF"),
        "GIF": encode(pal, "GIF", transparency=5),
        "JPEG rotated": encode(rgb, "JPEG", exif=exif),
    }


@pytest.mark.parametrize("name", sorted(_mode_samples()))
def test_strip_conversion_equals_whole_image_conversion(name, monkeypatch):
    monkeypatch.setattr(images, "_STRIP_PIXELS", 50)
    data = _mode_samples()[name]
    out = decode_image(data)
    assert out.bgr.flags.c_contiguous and out.bgr.dtype == np.uint8
    assert np.array_equal(out.bgr, old_to_bgr(data))


# --- warnings: set once at import, never swapped per call ----------------------


def test_decoding_from_8_threads_leaves_warning_filters_unchanged():
    rng = np.random.default_rng(9)
    data = encode(Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)), "PNG")
    before = list(warnings.filters)
    start = threading.Barrier(8)
    errors = []

    def work():
        try:
            start.wait()
            for _ in range(25):
                decode_image(data)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert warnings.filters == before


def test_import_sets_pillow_limit_and_quiets_pillow_warnings_once(tmp_path):
    corrupt_exif = tmp_path / "corrupt_exif.jpg"  # IFD claims 5 entries, has none
    corrupt_exif.write_bytes(encode(Image.new("RGB", (8, 8)), "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00"))
    bomb = tmp_path / "bomb.png"  # 156 MP: Pillow warns, does not refuse
    bomb.write_bytes(encode(Image.new("1", (12_500, 12_500)), "PNG"))
    with warnings.catch_warnings(record=True) as caught:  # both files do make Pillow warn
        warnings.simplefilter("always")
        Image.open(io.BytesIO(corrupt_exif.read_bytes())).getexif()
        Image.open(io.BytesIO(bomb.read_bytes()))
    assert {w.category for w in caught} == {UserWarning, Image.DecompressionBombWarning}
    code = textwrap.dedent(
        f"""
        import importlib, io, warnings
        import numpy
        from PIL import Image
        n = len(warnings.filters)
        import mmdet_ls.images as m
        assert Image.MAX_IMAGE_PIXELS == m.DEFAULT_MAX_PIXELS
        added = len(warnings.filters) - n
        importlib.reload(m)
        assert len(warnings.filters) - n == added == 2, (added, warnings.filters[:3])
        # -W error: any Pillow warning that got through would raise here.
        Image.open(io.BytesIO(open({str(corrupt_exif)!r}, "rb").read())).getexif()
        try:
            m.decode_image(open({str(bomb)!r}, "rb").read(), max_pixels=200_000_000, max_decode_bytes=64 << 20)
        except m.ImageDecodeError as exc:
            assert "needs about" in str(exc), exc
        else:
            raise AssertionError("not refused")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
