"""Label Studio's brush RLE (the `rle` of a BrushLabels region), encoded and decoded with numpy.

The format is thi-ng's rle-pack (github.com/thi-ng/umbrella, packages/rle-pack), applied to
the mask as an RGBA image flattened row-major (H*W*4 bytes). Label Studio's frontend decodes
it; its Python encoder is label_studio_sdk.converter.brush.encode_rle/mask2rle. Bit stream,
most significant bit first:

    32 bits  count of values (H*W*4)
     5 bits  word size - 1            (7: bytes)
    4x4 bits RLE length field sizes - 1 ([3, 4, 8, 16] bits)
    per run  1 bit series flag, 2 bits size index, length-1 in that size, 8-bit value

then zero bits up to a whole byte. We match label_studio_sdk's encoder byte for byte,
including its quirks: runs over 256 values always use the 16-bit field, split into
65536-long pieces, and the padding is `8 - nbits % 8` bits (a whole zero byte when the
stream already ends on a byte boundary).
"""
from __future__ import annotations

import numpy as np

MAX_PIXELS = 2**32 // 4 - 1  # the value count (4 per pixel) is a 32-bit field
_SIZES = (3, 4, 8, 16)
_HEADER = [(7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15]  # word size 8, sizes [3, 4, 8, 16], minus 1 each


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a 2-D bool/0-1 mask (H x W, the image as displayed): the bytes
    of the run-length code of the mask as an RGBA image (every channel 255 where the mask is set,
    else 0), exactly what label_studio_sdk.converter.brush.mask2rle(mask.astype(np.uint8) * 255)
    encodes, as a list of ints 0-255 (the JSON form Label Studio stores under value.rle)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not 0 < mask.size <= MAX_PIXELS:
        raise ValueError(f"mask must have 1 to {MAX_PIXELS} pixels, got {mask.size}")
    if mask.dtype != bool:
        # A score map or a 0/255 image would otherwise be silently misread.
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be bool or hold only 0 and 1")
        mask = mask != 0
    flat = mask.ravel()

    # Runs of equal pixels, row-major; a pixel is 4 equal bytes, so a run of n pixels is
    # one run of 4n values (never a single value: the "single value" code is never needed).
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = 4 * np.diff(np.append(starts, flat.size))
    values = np.where(flat[starts], 255, 0)

    # Size index as in the reference: <=8 -> 3 bits, <=16 -> 4, <=256 -> 8, else 16 bits,
    # the latter cut into 65536-long pieces plus the remainder (still in 16 bits).
    index = np.searchsorted([8, 16, 256], lengths)
    pieces = np.where(index == 3, -(-lengths // 65536), 1)
    last = np.cumsum(pieces) - 1
    run = np.repeat(np.arange(lengths.size), pieces)
    piece_len = np.full(run.size, 65536, dtype=np.int64)
    piece_len[last] = lengths - 65536 * (pieces - 1)
    index, values = index[run], values[run]
    field = np.array(_SIZES)[index]

    # One code per piece (1, index, length-1, value), at most 27 bits; the header as two codes.
    codes = (1 << (field + 10)) | (index << (field + 8)) | ((piece_len - 1) << 8) | values
    codes = np.concatenate(([lengths.sum()], _HEADER, codes)).astype(">u4")
    widths = np.concatenate(([32, 21], field + 11))
    bits = np.unpackbits(codes.view(np.uint8)).reshape(-1, 32)
    stream = bits[np.arange(32) >= 32 - widths[:, None]]  # each code's low `width` bits, in order

    out = np.zeros(stream.size // 8 + 1, dtype=np.uint8)  # +1: the reference's padding quirk
    packed = np.packbits(stream)
    out[: packed.size] = packed
    return out.tolist()


def brush_rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """The bool H x W mask of a brush RLE (alpha channel != 0); ValueError if it is malformed
    or does not hold exactly height * width RGBA pixels."""
    if not (0 < height and 0 < width and height * width <= MAX_PIXELS):
        raise ValueError(f"bad mask size {height}x{width}")
    data = np.asarray(rle)
    if data.ndim != 1 or (data.size and (data.dtype.kind not in "iu" or data.min() < 0 or data.max() > 255)):
        raise ValueError("rle must be a list of ints 0-255")
    # A bit string: Python slices and int(..., 2) read any field width without bit arithmetic.
    bits = bin(int.from_bytes(data.astype(np.uint8).tobytes(), "big"))[2:].zfill(8 * data.size)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("rle is truncated")
        pos += n
        return int(bits[pos - n:pos], 2)

    num = read(32)
    if num != height * width * 4:
        raise ValueError(f"rle holds {num} values, expected {height * width * 4} ({height}x{width} RGBA)")
    if read(5) + 1 != 8:
        raise ValueError("rle word size is not 8 bits")
    sizes = [read(4) + 1 for _ in range(4)]

    run_values: list[int] = []
    run_lengths: list[int] = []
    i = 0
    while i < num:
        series = read(1)
        n = 1 + read(sizes[read(2)])
        if i + n > num:
            raise ValueError("rle run goes past the value count")
        if series:
            run_values.append(read(8))
            run_lengths.append(n)
        else:
            run_values.extend(read(8) for _ in range(n))
            run_lengths.extend([1] * n)
        i += n
    rgba = np.repeat(np.array(run_values, dtype=np.uint8), run_lengths)
    return rgba.reshape(height, width, 4)[:, :, 3] != 0
