"""mmdet_ls.brush_rle against our decoder and against Label Studio's own encoder/decoder."""
import json
import subprocess
import textwrap

import numpy as np
import pytest
from labelstudio_server import ensure_installed

from mmdet_ls.brush_rle import MAX_PIXELS, brush_rle_to_mask, mask_to_brush_rle


def blobs(h, w, n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for cy, cx, r in zip(rng.integers(0, h, n), rng.integers(0, w, n), rng.integers(2, max(3, min(h, w) // 3), n)):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return mask


def corner(h, w, y, x):
    mask = np.zeros((h, w), bool)
    mask[y, x] = True
    return mask


def line(h, w):
    mask = np.zeros((h, w), bool)
    mask[:, w // 2] = True
    return mask


def noise(h, w, seed=1):
    return np.random.default_rng(seed).random((h, w)) < 0.5


# Small masks: label_studio_sdk's encoder builds a bit string and takes seconds on real images.
CASES = {
    "empty": np.zeros((8, 8), bool),
    "full_10x10_ends_on_byte": np.ones((10, 10), bool),  # 53 + 27 bits: reference pads a whole byte
    "corner_tl": corner(7, 9, 0, 0),
    "corner_tr": corner(7, 9, 0, 8),
    "corner_bl": corner(7, 9, 6, 0),
    "corner_br": corner(7, 9, 6, 8),
    "line": line(16, 13),
    "blobs": blobs(64, 64, 4),
    "noise": noise(32, 32),  # runs of every short size field
    "full_200x120": np.ones((200, 120), bool),  # 96000 values: a 65536 piece and a remainder
    "long_run_remainder_4": np.ones((1, 16385), bool),  # 65536 + 4 values
    "run_exactly_2x65536": np.ones((128, 256), bool),
    "1x1_set": np.ones((1, 1), bool),
    "1x1_clear": np.zeros((1, 1), bool),
    "1xN": noise(1, 37, seed=2),
    "Nx1": noise(41, 1, seed=3),
}


@pytest.mark.parametrize("name", [*CASES, "full_300x300"])
def test_round_trip_through_our_decoder(name):
    mask = CASES.get(name, np.ones((300, 300), bool))
    rle = mask_to_brush_rle(mask)
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in rle)
    got = brush_rle_to_mask(rle, *mask.shape)
    assert got.dtype == bool and got.shape == mask.shape
    np.testing.assert_array_equal(got, mask)


def test_accepts_0_1_ints_and_non_contiguous_masks():
    mask = blobs(40, 50, 3)
    assert mask_to_brush_rle(mask.astype(np.uint8)) == mask_to_brush_rle(mask)
    assert mask_to_brush_rle(mask.T) == mask_to_brush_rle(np.ascontiguousarray(mask.T))


def test_padding_matches_reference_quirk():
    # 53 header bits + one 27-bit run = 80 bits: the reference still appends 8 zero bits.
    assert mask_to_brush_rle(np.ones((10, 10), bool)) == [0, 0, 1, 144, 57, 27, 255, 1, 143, 255, 0]
    assert len(mask_to_brush_rle(np.zeros((1, 1), bool))) == 9  # 67 bits -> 9 bytes, no extra byte


REFERENCE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from label_studio_sdk.converter.brush import decode_rle, mask2rle
    root = Path(sys.argv[1])
    for name in json.loads((root / "names.json").read_text()):
        mask = np.load(root / f"{name}.npy")
        ours = json.loads((root / f"{name}.ours.json").read_text())
        (root / f"{name}.ref.json").write_text(json.dumps(mask2rle(mask.astype(np.uint8) * 255)))
        np.save(root / f"{name}.decoded.npy", decode_rle(ours).reshape(*mask.shape, 4))
""")


def test_byte_equal_to_label_studio_and_decoded_by_it(tmp_path):
    # Fails (does not skip) without Label Studio, as the e2e tests do.
    venv, _, _ = ensure_installed()
    for name, mask in CASES.items():
        np.save(tmp_path / f"{name}.npy", mask)
        (tmp_path / f"{name}.ours.json").write_text(json.dumps(mask_to_brush_rle(mask)))
    (tmp_path / "names.json").write_text(json.dumps(list(CASES)))
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", REFERENCE, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"Label Studio's brush converter failed:\n{proc.stderr}"
    for name, mask in CASES.items():
        ours = json.loads((tmp_path / f"{name}.ours.json").read_text())
        assert ours == json.loads((tmp_path / f"{name}.ref.json").read_text()), name
        rgba = np.load(tmp_path / f"{name}.decoded.npy")
        np.testing.assert_array_equal(rgba, np.repeat(mask[:, :, None] * np.uint8(255), 4, axis=2), err_msg=name)


def test_output_is_bounded_by_outline_not_area():
    mask = np.zeros((1080, 1920), bool)
    mask[300:600, 700:1100] = True
    rle = mask_to_brush_rle(mask)
    assert len(rle) < 10_000
    np.testing.assert_array_equal(brush_rle_to_mask(rle, 1080, 1920), mask)


@pytest.mark.parametrize("mask", [
    np.zeros(5, bool), np.zeros((2, 2, 2), bool), np.zeros((0, 4), bool),
    np.full((2, 2), 255, np.uint8), np.full((2, 2), 0.5),
])
def test_encoder_refuses(mask):
    with pytest.raises(ValueError):
        mask_to_brush_rle(mask)


def test_encoder_refuses_more_pixels_than_the_count_holds():
    assert MAX_PIXELS == 2**30 - 1
    with pytest.raises(ValueError, match="pixels"):
        mask_to_brush_rle(np.broadcast_to(np.zeros(1, bool), (2**15, 2**15)))


def test_decoder_refuses_malformed():
    rle = mask_to_brush_rle(blobs(20, 30, 2))
    with pytest.raises(ValueError, match="values"):
        brush_rle_to_mask(rle, 30, 20 + 1)  # count is not H*W*4
    with pytest.raises(ValueError, match="truncated"):
        brush_rle_to_mask(rle[: len(rle) // 2], 20, 30)
    with pytest.raises(ValueError, match="truncated"):
        brush_rle_to_mask(rle[:3], 20, 30)
    with pytest.raises(ValueError, match="0-255"):
        brush_rle_to_mask([*rle[:-1], 256], 20, 30)
    with pytest.raises(ValueError, match="0-255"):
        brush_rle_to_mask([float(b) for b in rle], 20, 30)
    with pytest.raises(ValueError, match="size"):
        brush_rle_to_mask(rle, 0, 30)
    # A run that claims more values than the count.
    one = mask_to_brush_rle(np.ones((1, 1), bool))
    with pytest.raises(ValueError, match="past"):
        brush_rle_to_mask(one[:7] + [one[7] | 0b11100000] + one[8:], 1, 1)
