"""mmdet_ls.masks (MaskCrop, polygons) and inference.mask_crops, on real numpy/torch/OpenCV.

Coordinates: a polygon from mask_polygons is in pixels of the whole image with
pixel edges at integers, so pixel (row r, column c) is the square [c, c+1] x
[r, r+1] and its centre is (c + 0.5, r + 0.5). `rasterize` below sets a pixel
when its centre is inside the polygon or on its boundary, computed exactly
(even-odd crossings plus an on-segment test). PIL's ImageDraw.polygon puts
pixel centres at integers (it would need the points shifted by -0.5) and
rounds the edges' crossings: on the scenes below it disagrees with the exact
rule on ~1.5 % of the pixels, so it is not used.
"""
import pickle

import numpy as np
import pytest
from mask_fixtures import rasterize
from toy_detector.scenes import make_scene_with_masks

from mmdet_ls.masks import (
    DEFAULT_MAX_POINTS,
    MAX_PIECES,
    MIN_PIECE_FRACTION,
    MaskCrop,
    crop_full_mask,
    is_valid_polygon,
    mask_polygons,
    polygon_area,
    polygon_to_percent,
)


# ----------------------------------------------------------------- helpers --
def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def disk(h, w, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < r * r


def check_polygons(polygons, height, width, max_points):
    """The module's promises for any polygon, plus: inside the image."""
    assert len(polygons) <= MAX_PIECES
    for p in polygons:
        assert p.ndim == 2 and p.shape[1] == 2 and p.dtype == np.float64
        assert is_valid_polygon(p), p.tolist()
        assert 3 <= len(p) <= max_points, (len(p), max_points)
        assert (p[:, 0] >= 0).all() and (p[:, 0] <= width).all(), p.tolist()
        assert (p[:, 1] >= 0).all() and (p[:, 1] <= height).all(), p.tolist()


def test_rasterizer_uses_pixel_centres_inside_or_on():
    # The square through the centres of pixels (1..3, 2..4) holds exactly those 3 x 3 pixels.
    square = np.array([[1.5, 2.5], [3.5, 2.5], [3.5, 4.5], [1.5, 4.5]])
    expected = np.zeros((7, 6), bool)
    expected[2:5, 1:4] = True
    assert (rasterize([square], 7, 6) == expected).all()
    # The pixel square [2, 3] x [1, 2] in pixel-edge coordinates holds pixel (row 1, col 2) only.
    expected = np.zeros((4, 5), bool)
    expected[1, 2] = True
    assert (rasterize([np.array([[2.0, 1.0], [3.0, 1.0], [3.0, 2.0], [2.0, 2.0]])], 4, 5) == expected).all()


# ---------------------------------------------------------------- MaskCrop --
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (37, 53), (64, 64), (3, 200)])
def test_mask_crop_round_trip_keeps_exactly_the_extent(shape):
    h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    for density in (0.02, 0.3, 0.9, 1.0):
        mask = rng.random(shape) < density
        if not mask.any():
            mask[h // 2, w // 2] = True
        crop = crop_full_mask(mask)
        ys, xs = np.nonzero(mask)
        assert (crop.x0, crop.y0, crop.width, crop.height) == (
            xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        arr = crop.to_array()
        assert arr.dtype == bool and arr.shape == (crop.height, crop.width)
        assert (arr == mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]).all()
        # exactly the extent: a set pixel on each side of the crop
        assert arr[0].any() and arr[-1].any() and arr[:, 0].any() and arr[:, -1].any()
        full = crop.full(h, w)
        assert full.dtype == bool and (full == mask).all()
        assert crop.nbytes == -(-crop.width * crop.height // 8) and not crop.is_empty
        assert MaskCrop.from_crop(crop.x0, crop.y0, arr) == crop


def test_mask_crop_of_an_object_inside_a_larger_image():
    mask = np.zeros((50, 80), bool)
    mask[10:14, 30:35] = True
    mask[12, 36] = True
    crop = crop_full_mask(mask)
    assert (crop.x0, crop.y0, crop.width, crop.height) == (30, 10, 7, 4)
    assert crop.nbytes == 4  # 28 bits
    assert (crop.full(50, 80) == mask).all()


def test_empty_masks_are_empty_crops():
    for crop in (crop_full_mask(np.zeros((20, 30), bool)), MaskCrop.from_crop(5, 7, np.zeros((4, 4), bool)),
                 MaskCrop.empty()):
        assert crop.is_empty and crop.nbytes == 0
        assert crop.to_array().shape == (0, 0)
        assert not crop.full(20, 30).any()
        assert mask_polygons(crop) == []


# -------------------------------------------------------------- mask_crops --
def test_mask_crops_of_a_bool_tensor_equal_the_masks():
    torch = pytest.importorskip("torch")
    from mmdet_ls.inference import mask_crops

    rng = np.random.default_rng(3)
    masks = np.zeros((6, 40, 60), bool)
    masks[0] = disk(40, 60, 20, 30, 12)
    masks[1] = rng.random((40, 60)) < 0.1  # scattered, extent ~ the image
    masks[3, 0, 0] = masks[3, 39, 59] = True  # two opposite corners
    masks[4, 5:9, 50:60] = True  # touching the right edge
    masks[5] = True
    crops = mask_crops(torch.from_numpy(masks), 6)
    assert len(crops) == 6
    for k, crop in enumerate(crops):
        assert isinstance(crop, MaskCrop)
        assert (crop.full(40, 60) == masks[k]).all(), k
        assert crop == crop_full_mask(masks[k])  # same extent and bits as the numpy path
    assert crops[2].is_empty and crops[2].nbytes == 0  # an empty mask
    assert (crops[4].x0, crops[4].y0, crops[4].width, crops[4].height) == (50, 5, 10, 4)


def test_mask_crops_of_float_masks_threshold_at_half():
    torch = pytest.importorskip("torch")
    from mmdet_ls.inference import mask_crops

    probs = np.zeros((3, 10, 12), np.float32)
    probs[0, 2:6, 3:9] = 0.9
    probs[0, 2:6, 3] = 0.49  # just under: not in the mask
    probs[0, 7, 10] = 0.51  # just over: in the mask
    probs[1] = 0.3  # everywhere under the threshold: empty
    probs[2, 4, 4] = 1.0
    crops = mask_crops(torch.from_numpy(probs), 3)
    expected = probs[0] > 0.5
    assert expected[7, 10] and not expected[2:6, 3].any()
    assert (crops[0].full(10, 12) == expected).all()
    assert (crops[0].x0, crops[0].y0, crops[0].width, crops[0].height) == (4, 2, 7, 6)
    assert crops[1].is_empty
    assert (crops[2].x0, crops[2].y0, crops[2].width, crops[2].height) == (4, 4, 1, 1)


def test_mask_crops_refuses_a_count_or_shape_mismatch():
    torch = pytest.importorskip("torch")
    from mmdet_ls.inference import mask_crops

    with pytest.raises(ValueError):
        mask_crops(torch.zeros((3, 10, 10), dtype=torch.bool), 2)
    with pytest.raises(ValueError):
        mask_crops(torch.zeros((10, 10), dtype=torch.bool), 1)


def test_mask_crops_of_100_instances_on_1080p_are_bounded_by_their_extents():
    torch = pytest.importorskip("torch")
    from mmdet_ls.inference import mask_crops

    rng = np.random.default_rng(7)
    h, w, n = 1080, 1920, 100
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    extent_area = 0
    for k in range(n):
        bw, bh = np.exp(rng.uniform(np.log(16), np.log(600), 2)).astype(int)  # typical object sizes
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        yy, xx = np.mgrid[:bh, :bw] + 0.5
        ellipse = ((xx - bw / 2) / (bw / 2)) ** 2 + ((yy - bh / 2) / (bh / 2)) ** 2 <= 1  # fills its box
        masks[k, y0:y0 + bh, x0:x0 + bw] = torch.from_numpy(ellipse)
        extent_area += int(bw) * int(bh)
    crops = mask_crops(masks, n)
    total = sum(c.nbytes for c in crops)
    assert total <= extent_area / 8 + n  # each crop rounds up to a whole byte at most
    assert total < n * h * w / 50  # vs the full N x H x W bool masks
    assert len(pickle.dumps(crops)) <= total + 100 * n  # what crosses the object store
    assert all((c.full(h, w) == masks[k].numpy()).all() for k, c in enumerate(crops[:5]))


# ---------------------------------------------------------------- polygons --
@pytest.mark.parametrize("max_points", [3, 8, 100])
def test_polygons_of_random_noise_are_valid(max_points):
    rng = np.random.default_rng(max_points)
    checked = 0
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        density = (0.05, 0.2, 0.5, 0.8, 0.95)[trial % 5]
        mask = rng.random((h, w)) < density
        for tolerance in (0.5, 1.0, 3.0):
            polygons = mask_polygons(crop_full_mask(mask), tolerance, max_points)
            assert bool(polygons) == bool(mask.any())
            check_polygons(polygons, h, w, max_points)
            checked += len(polygons)
    assert checked > 500


def _shapes():
    h, w = 12, 16
    shapes = {}

    def new():
        return np.zeros((h, w), bool)

    m = new()
    m[5, 7] = True
    shapes["single_pixel"] = m
    for name, (y, x) in {"tl": (0, 0), "tr": (0, w - 1), "bl": (h - 1, 0), "br": (h - 1, w - 1)}.items():
        m = new()
        m[y, x] = True
        shapes[f"pixel_corner_{name}"] = m
        m = new()
        m[max(0, y - 3):y + 4, max(0, x - 4):x + 5] = True
        shapes[f"block_corner_{name}"] = m
    m = new()
    m[4, 2:13] = True
    shapes["hline"] = m
    m = new()
    m[1:11, 6] = True
    shapes["vline"] = m
    i = np.arange(10)
    m = new()
    m[i + 1, i + 3] = True
    shapes["diagonal"] = m
    m = new()
    m[i + 1, 12 - i] = True
    shapes["anti_diagonal"] = m
    m = new()
    m[3, 3] = m[4, 4] = True
    shapes["checker_2x2"] = m
    m = new()
    m[3, 4] = m[4, 3] = True
    shapes["checker_2x2_other"] = m
    m = new()
    m[0, :] = True
    shapes["edge_top"] = m
    m = new()
    m[-1, 3:9] = True
    shapes["edge_bottom"] = m
    m = new()
    m[2:7, 0] = True
    shapes["edge_left"] = m
    m = new()
    m[:, -2:] = True
    shapes["edge_right"] = m
    shapes["whole_image"] = np.ones((h, w), bool)
    shapes["whole_1x1"] = np.ones((1, 1), bool)
    shapes["whole_1x5"] = np.ones((1, 5), bool)
    shapes["whole_5x1"] = np.ones((5, 1), bool)
    return shapes


SHAPES = _shapes()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("max_points", [3, 4, 8, 100])
def test_polygons_of_degenerate_and_edge_masks_are_valid(name, max_points):
    mask = SHAPES[name]
    polygons = mask_polygons(crop_full_mask(mask), 1.0, max_points)
    assert polygons
    check_polygons(polygons, *mask.shape, max_points)
    if max_points >= 4 and name not in ("diagonal", "anti_diagonal", "checker_2x2", "checker_2x2_other"):
        # axis-aligned rectangles (a pixel, a line, a block, the whole image): drawn exactly
        assert (rasterize(polygons, *mask.shape) == mask).all(), [p.tolist() for p in polygons]
    if max_points >= 4:  # the hull of a thin diagonal covers it (and its neighbours: centres on its edges)
        assert (rasterize(polygons, *mask.shape) >= mask).all()


def test_polygon_vertices_are_at_boundary_pixel_centres():
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:8] = True  # rows 2..5, columns 3..7
    (poly,) = mask_polygons(crop_full_mask(mask))
    assert sorted(map(tuple, poly.tolist())) == [(3.5, 2.5), (3.5, 5.5), (7.5, 2.5), (7.5, 5.5)]


def test_whole_image_mask_is_one_rectangle():
    mask = np.ones((30, 40), bool)
    (poly,) = mask_polygons(crop_full_mask(mask))
    assert sorted(map(tuple, poly.tolist())) == [(0.5, 0.5), (0.5, 29.5), (39.5, 0.5), (39.5, 29.5)]
    percent = polygon_to_percent(poly, 40, 30)
    assert min(min(p) for p in percent) >= 0 and max(max(p) for p in percent) <= 100


def test_ring_gives_its_outer_contour_only():
    outer = disk(60, 60, 30, 30, 22)
    ring = outer & ~disk(60, 60, 30, 30, 12)
    polygons = mask_polygons(crop_full_mask(ring))
    assert len(polygons) == 1  # the hole is not a piece
    check_polygons(polygons, 60, 60, DEFAULT_MAX_POINTS)
    # exactly the filled disk's polygon: the hole leaves no trace
    assert np.array_equal(polygons[0], mask_polygons(crop_full_mask(outer))[0])
    drawn = rasterize(polygons, 60, 60)
    assert drawn[disk(60, 60, 30, 30, 12)].all()  # the hole is drawn filled
    assert iou(drawn, outer) >= 0.9


# ------------------------------------------------------------ pieces rule --
def test_two_similar_blobs_give_two_polygons_largest_first():
    small, large = disk(80, 140, 40, 30, 17), disk(80, 140, 40, 100, 19)
    polygons = mask_polygons(crop_full_mask(small | large))
    assert len(polygons) == 2
    assert polygon_area(polygons[0]) > polygon_area(polygons[1])
    assert iou(rasterize(polygons[:1], 80, 140), large) >= 0.9
    assert iou(rasterize(polygons[1:], 80, 140), small) >= 0.9


def test_a_crumb_under_the_piece_fraction_is_dropped():
    blob = disk(80, 80, 40, 40, 20)  # ~1250 pixels
    crumb = np.zeros((80, 80), bool)
    crumb[2:5, 2:5] = True  # 9 pixels
    assert crumb.sum() < MIN_PIECE_FRACTION * blob.sum()
    polygons = mask_polygons(crop_full_mask(blob | crumb))
    assert len(polygons) == 1
    assert iou(rasterize(polygons, 80, 80), blob) >= 0.9
    # a piece well over the fraction (~40 %) stays
    piece = disk(80, 80, 13, 13, 11)
    assert piece.sum() > 2.5 * MIN_PIECE_FRACTION * blob.sum() and not (piece & blob).any()
    assert len(mask_polygons(crop_full_mask(blob | piece))) == 2


def test_at_most_max_pieces_polygons():
    mask = np.zeros((20, 10 * (MAX_PIECES + 3)), bool)
    for k in range(MAX_PIECES + 3):
        mask[5:11, 10 * k + 2:10 * k + 8] = True  # equal 6 x 6 squares, 4 pixels apart
    polygons = mask_polygons(crop_full_mask(mask))
    assert len(polygons) == MAX_PIECES
    check_polygons(polygons, *mask.shape, DEFAULT_MAX_POINTS)
    assert all(polygon_area(p) == pytest.approx(25.0) for p in polygons)  # 6 x 6 pixels, through their centres


# ---------------------------------------------------------------- fidelity --
SCENES = [make_scene_with_masks(seed) for seed in range(30)]


def test_polygons_of_scene_objects_match_their_masks():
    ious = []
    for _, objects in SCENES:
        for obj in objects:
            mask = obj["mask"]
            h, w = mask.shape
            polygons = mask_polygons(crop_full_mask(mask))
            check_polygons(polygons, h, w, DEFAULT_MAX_POINTS)
            ious.append(iou(rasterize(polygons, h, w), mask))
            assert ious[-1] >= 0.9, (obj["label"], obj["bbox"], ious[-1])
    assert len(ious) >= 50
    assert np.mean(ious) >= 0.95


def test_polygon_to_percent_is_in_range_and_maps_back():
    for _, objects in SCENES[:10]:
        for obj in objects:
            h, w = obj["mask"].shape
            for poly in mask_polygons(crop_full_mask(obj["mask"])):
                percent = np.array(polygon_to_percent(poly, w, h))
                assert percent.shape == poly.shape
                assert (percent >= 0).all() and (percent <= 100).all()
                back = percent * np.array([w, h]) / 100.0
                assert np.abs(back - poly).max() <= 0.5e-4 * max(w, h) / 100 + 1e-9
    # points off the image are clipped to its edges
    assert polygon_to_percent(np.array([[-5.0, 10.0], [250.0, -1.0], [100.0, 120.0]]), 200, 100) == [
        [0.0, 10.0], [100.0, 0.0], [50.0, 100.0]]


# --------------------------------------------------------------- tolerance --
def test_larger_tolerance_gives_fewer_or_equal_vertices():
    # Up to 8 px, below the half-width of every object (>= 20 px short side):
    # Douglas-Peucker keeps a subset of the vertices as the tolerance grows.
    tolerances = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    shapes = [obj["mask"] for _, objects in SCENES[:15] for obj in objects] + [disk(100, 100, 50, 50, 40)]
    for mask in shapes:
        crop = crop_full_mask(mask)
        counts = [[len(p) for p in mask_polygons(crop, t)] for t in tolerances]
        assert all(len(c) == len(counts[0]) for c in counts)  # same pieces
        for a, b in zip(counts, counts[1:]):
            assert all(x >= y for x, y in zip(a, b)), counts
        assert sum(counts[0]) > sum(counts[-1])  # and it does simplify


@pytest.mark.parametrize("max_points", [3, 4, 5, 10, 20])
def test_max_points_caps_the_vertices(max_points):
    for _, objects in SCENES[:10]:
        for obj in objects:
            mask = obj["mask"]
            polygons = mask_polygons(crop_full_mask(mask), 0.25, max_points)
            check_polygons(polygons, *mask.shape, max_points)
            if max_points >= 20:  # still the object's shape
                assert iou(rasterize(polygons, *mask.shape), mask) >= 0.85
    # an uncapped circle needs more than these
    assert len(mask_polygons(crop_full_mask(disk(100, 100, 50, 50, 40)), 0.25, 1000)[0]) > 20
