import io

import numpy as np
import pytest
from PIL import Image

from mmdet_ls.images import ImageDecodeError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_becomes_bgr():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    out = decode_image(encode(img, "PNG"))
    assert (out.width, out.height) == (40, 30)
    assert out.bgr.shape == (30, 40, 3) and out.bgr.dtype == np.uint8
    assert tuple(out.bgr[0, 0]) == (0, 0, 255)  # BGR order, as mmdet expects


def test_exif_rotated_jpeg_is_returned_in_display_orientation():
    stored = Image.new("RGB", (60, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert (out.width, out.height) == (20, 60) and out.exif_transposed
    # Rotating 90 CW moves the stored left edge to the displayed top.
    assert out.bgr[:10, :, :].mean() > 200 and out.bgr[20:, :, :].mean() < 50


def test_grey_palette_rgba_cmyk_inputs():
    grey = decode_image(encode(Image.new("L", (8, 6), 128), "PNG"))
    assert grey.bgr.shape == (6, 8, 3) and int(grey.bgr[0, 0, 0]) == 128
    pal = Image.new("P", (8, 6))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 8, 6))
    assert tuple(decode_image(encode(pal, "PNG")).bgr[0, 0]) == (30, 200, 10)
    rgba = Image.new("RGBA", (8, 6), (0, 0, 255, 0))  # fully transparent: shows as white
    assert tuple(decode_image(encode(rgba, "PNG")).bgr[0, 0]) == (255, 255, 255)
    cmyk = decode_image(encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"))
    b, g, r = (int(v) for v in cmyk.bgr[0, 0])
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grey_is_stretched_not_clipped():
    arr = np.array([[0, 30000], [60000, 65535]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    values = out.bgr[:, :, 0]
    assert values[0, 0] == 0 and values[1, 1] == 255 and 100 < values[0, 1] < 130


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    b, g, r = (int(v) for v in out.bgr[0, 0])
    assert r > 200 and g < 50


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"<html><body>not found</body></html>", "not an image"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:300], "corrupt or truncated"),
    ],
)
def test_bad_bytes_get_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decompression_bomb_refused_before_decoding():
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # tiny file, 400 MP
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match="decompression bomb|MP; at most"):
        decode_image(bomb)


def test_side_limit():
    with pytest.raises(ImageDecodeError, match="largest side"):
        decode_image(encode(Image.new("1", (25_000, 2)), "PNG"))
