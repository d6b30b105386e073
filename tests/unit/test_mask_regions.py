"""Polygon and brush regions from instance masks (mmdet_ls.regions), with the real
label-config parser, polygon code and brush RLE decoder."""
import numpy as np
import pytest

from mmdet_ls.brush_rle import brush_rle_to_mask
from mmdet_ls.label_config import LabelSpec, RegionTarget, parse_label_config
from mmdet_ls.masks import MaskCrop, crop_full_mask, is_valid_polygon, mask_polygons, polygon_to_percent
from mmdet_ls.regions import (
    Detections,
    MasksMissing,
    MaskStyle,
    RegionStats,
    detections_to_regions,
    image_result,
    mask_payload_bytes,
)

W, H = 200, 100
LABELS = (LabelSpec("Car", ("car", "truck")), LabelSpec("Person", ("person",)))
POLY = RegionTarget("outline", "img", "image", LABELS, kind="polygonlabels")
BRUSH = RegionTarget("paint", "img", "image", LABELS, kind="brushlabels")
RECT = RegionTarget("box", "img", "image", LABELS)
ALL_KINDS_XML = (
    '<View><Image name="img" value="$image"/>'
    '<RectangleLabels name="box" toName="img"><Label value="Car" predicted_values="car,truck"/>'
    '<Label value="Person" predicted_values="person"/></RectangleLabels>'
    '<PolygonLabels name="outline" toName="img"><Label value="Car" predicted_values="car,truck"/>'
    '<Label value="Person" predicted_values="person"/></PolygonLabels>'
    '<BrushLabels name="paint" toName="img"><Label value="Car" predicted_values="car,truck"/>'
    '<Label value="Person" predicted_values="person"/></BrushLabels>'
    "</View>")
REGION_KEYS = {"id", "from_name", "to_name", "type", "original_width", "original_height", "image_rotation", "value",
               "score"}


def disk(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < r * r


def rect(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def extent(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else [10, 10, 20, 20]


def dets(masks, scores, names, boxes=None, with_masks=True, w=W, h=H):
    boxes = boxes if boxes is not None else [extent(m) for m in masks]
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), list(names), w, h,
                      masks=[crop_full_mask(m) for m in masks] if with_masks else None)


def scene():
    """A truck (disk touching the top edge), a dog (unmapped), a person (rectangle
    touching the bottom-right corner), a car under the default threshold."""
    masks = [disk(12, 40, 14), disk(50, 100, 10), rect(150, 60, 200, 100), disk(60, 40, 12)]
    return masks, dets(masks, [0.9, 0.95, 0.8, 0.3], ["truck", "dog", "person", "car"])


# ------------------------------------------------------------------ shape --
def test_polygon_regions_have_label_studio_shape_mapping_and_points():
    masks, d = scene()
    stats = RegionStats()
    regions = detections_to_regions(d, POLY, 0.5, stats)
    assert [r["value"]["polygonlabels"] for r in regions] == [["Car"], ["Person"]]  # best first, mapped
    assert [r["score"] for r in regions] == [pytest.approx(0.9), pytest.approx(0.8)]
    assert (stats.kept, stats.below_threshold, stats.unmapped, stats.empty_mask) == (2, 1, 1, 0)
    for region, mask in zip(regions, (masks[0], masks[2])):
        assert set(region) == REGION_KEYS
        assert (region["type"], region["from_name"], region["to_name"]) == ("polygonlabels", "outline", "img")
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
        value = region["value"]
        assert set(value) == {"points", "closed", "polygonlabels"} and value["closed"] is True
        points = np.array(value["points"])
        assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
        assert (points >= 0).all() and (points <= 100).all()
        assert all(isinstance(c, float) for p in value["points"] for c in p)  # JSON numbers, not numpy
        assert is_valid_polygon(points)
        (expected,) = mask_polygons(crop_full_mask(mask))
        assert value["points"] == polygon_to_percent(expected, W, H)
    # the person's rectangle reaches the image's corner: its polygon is at the boundary pixels' centres
    person = np.array(regions[1]["value"]["points"])
    assert person[:, 0].max() == pytest.approx(100 * 199.5 / W) and person[:, 1].max() == pytest.approx(100 * 99.5 / H)


def test_brush_regions_decode_to_exactly_the_instance_mask():
    masks, d = scene()
    stats = RegionStats()
    regions = detections_to_regions(d, BRUSH, 0.5, stats)
    assert [r["value"]["brushlabels"] for r in regions] == [["Car"], ["Person"]]
    assert (stats.kept, stats.below_threshold, stats.unmapped) == (2, 1, 1)
    for region, mask in zip(regions, (masks[0], masks[2])):
        assert set(region) == REGION_KEYS
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "paint", "img")
        assert (region["original_width"], region["original_height"]) == (W, H)
        value = region["value"]
        assert set(value) == {"format", "rle", "brushlabels"} and value["format"] == "rle"
        assert all(type(b) is int and 0 <= b <= 255 for b in value["rle"])
        decoded = brush_rle_to_mask(value["rle"], H, W)
        assert decoded.shape == (H, W) and (decoded == mask).all()
        assert mask_payload_bytes(region) == 4 * len(value["rle"])


def test_brush_of_a_noisy_mask_on_a_non_square_image_is_exact():
    rng = np.random.default_rng(5)
    mask = np.zeros((37, 91), bool)
    mask[3:30, 10:80] = rng.random((27, 70)) < 0.6
    d = dets([mask], [0.7], ["person"], w=91, h=37)
    (region,) = detections_to_regions(d, BRUSH, 0.5)
    assert (brush_rle_to_mask(region["value"]["rle"], 37, 91) == mask).all()


# -------------------------------------------------------------- thresholds --
@pytest.mark.parametrize("kind", ["polygonlabels", "brushlabels", "rectanglelabels"])
def test_global_and_per_tag_thresholds_apply_to_every_kind(kind):
    masks = [disk(30, 30, 10), disk(30, 100, 10), disk(30, 160, 10)]
    d = dets(masks, [0.4, 0.6, 0.97], ["car"] * 3)
    target = RegionTarget("t", "img", "image", LABELS, kind=kind)
    stats = RegionStats()
    assert [r["score"] for r in detections_to_regions(d, target, 0.5, stats)] == [
        pytest.approx(0.97), pytest.approx(0.6)]
    assert stats.below_threshold == 1
    strict = RegionTarget("t", "img", "image", LABELS, score_threshold=0.95, kind=kind)
    stats = RegionStats()
    assert [r["score"] for r in detections_to_regions(d, strict, 0.1, stats)] == [pytest.approx(0.97)]
    assert stats.below_threshold == 2
    lax = RegionTarget("t", "img", "image", LABELS, score_threshold=0.0, kind=kind)  # 0.0 overrides too
    assert len(detections_to_regions(d, lax, 0.99)) == 3


def test_per_tag_threshold_from_the_label_config():
    config = parse_label_config(ALL_KINDS_XML.replace('<PolygonLabels name="outline"',
                                                      '<PolygonLabels name="outline" model_score_threshold="0.85"'))
    masks = [disk(30, 30, 10), disk(30, 100, 10)]
    result = image_result(dets(masks, [0.8, 0.9], ["car", "person"]), config.targets, 0.5)
    by_tag = {}
    for r in result.regions:
        by_tag.setdefault(r["from_name"], []).append(r["score"])
    assert by_tag == {"box": [pytest.approx(0.9), pytest.approx(0.8)], "outline": [pytest.approx(0.9)],
                      "paint": [pytest.approx(0.9), pytest.approx(0.8)]}
    assert result.stats.below_threshold == 1


# ------------------------------------------------------ missing and empty --
def test_empty_mask_counts_and_emits_no_mask_region_but_its_rectangle():
    masks = [disk(30, 30, 10), np.zeros((H, W), bool), disk(60, 150, 12)]
    d = dets(masks, [0.9, 0.8, 0.7], ["car", "person", "car"], boxes=[extent(masks[0]), [80, 20, 120, 60],
                                                                     extent(masks[2])])
    assert d.masks[1].is_empty
    config = parse_label_config(ALL_KINDS_XML)
    result = image_result(d, config.targets, 0.5)
    kinds = [(r["type"], r["score"]) for r in result.regions]
    assert kinds == [("rectanglelabels", pytest.approx(s)) for s in (0.9, 0.8, 0.7)] + [
        ("polygonlabels", pytest.approx(s)) for s in (0.9, 0.7)] + [
        ("brushlabels", pytest.approx(s)) for s in (0.9, 0.7)]
    assert (result.stats.empty_mask, result.stats.kept) == (2, 7)  # once per mask tag
    stats = RegionStats()
    assert [r["score"] for r in detections_to_regions(d, BRUSH, 0.5, stats)] == [pytest.approx(0.9),
                                                                                  pytest.approx(0.7)]
    assert (stats.empty_mask, stats.kept) == (1, 2)


@pytest.mark.parametrize("target", [POLY, BRUSH], ids=lambda t: t.kind)
def test_mask_tag_without_masks_raises_masks_missing_naming_the_tag(target):
    _, d = scene()
    d.masks = None
    with pytest.raises(MasksMissing) as exc:
        detections_to_regions(d, target, 0.5)
    assert target.tag in str(exc.value) and target.from_name in str(exc.value)
    with pytest.raises(MasksMissing, match=f'name="{target.from_name}"'):
        image_result(d, [RECT, target], 0.5)


def test_rectangles_need_no_masks():
    masks, _ = scene()
    d = dets(masks, [0.9, 0.95, 0.8, 0.3], ["truck", "dog", "person", "car"], with_masks=False)
    assert d.masks is None
    result = image_result(d, parse_label_config(
        '<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
        '<Label value="Car" predicted_values="car,truck"/><Label value="Person"/></RectangleLabels></View>').targets,
        0.5)
    assert [(r["type"], r["value"]["rectanglelabels"]) for r in result.regions] == [
        ("rectanglelabels", ["Car"]), ("rectanglelabels", ["Person"])]


# ----------------------------------------------------------------- budget --
def test_mask_payload_budget_keeps_the_best_scored():
    n = 10
    masks = [rect(5 + 19 * k, 10, 15 + 19 * k, 20 + k) for k in range(n)]  # rectangles: 4-point polygons
    scores = [0.5 + 0.04 * k for k in range(n)]  # the last is the best
    d = dets(masks, scores, ["car"] * n)
    unbounded = image_result(d, [RECT, POLY], 0.1)
    payloads = [mask_payload_bytes(r) for r in unbounded.regions if r["type"] == "polygonlabels"]
    assert payloads == [18 * 4] * n
    assert [mask_payload_bytes(r) for r in unbounded.regions if r["type"] == "rectanglelabels"] == [0] * n
    result = image_result(d, [RECT, POLY], 0.1, max_mask_bytes=4 * 72 + 71)  # room for 4 polygons, not 5
    polygons = [r for r in result.regions if r["type"] == "polygonlabels"]
    assert [r["score"] for r in polygons] == [pytest.approx(s) for s in sorted(scores, reverse=True)[:4]]
    assert sum(r["type"] == "rectanglelabels" for r in result.regions) == n  # no payload: all kept
    assert (result.stats.kept, result.stats.over_cap) == (n + 4, n - 4)
    assert [r["type"] for r in result.regions] == ["rectanglelabels"] * n + ["polygonlabels"] * 4  # tag order kept


def test_brush_payload_budget_keeps_the_best_scored():
    masks = [disk(50, 20 + 40 * k, 15) for k in range(5)]
    d = dets(masks, [0.6, 0.9, 0.7, 0.8, 0.5], ["person"] * 5)
    full = image_result(d, [BRUSH], 0.1)
    sizes = {r["score"]: mask_payload_bytes(r) for r in full.regions}
    assert len(set(sizes.values())) <= 2 and min(sizes.values()) > 100  # similar disks, similar RLE
    best3 = sorted(sizes, reverse=True)[:3]
    result = image_result(d, [BRUSH], 0.1, max_mask_bytes=sum(sizes[s] for s in best3))
    assert sorted((r["score"] for r in result.regions), reverse=True) == best3
    assert (result.stats.kept, result.stats.over_cap) == (3, 2)
    for r in result.regions:  # the kept ones are intact
        k = [pytest.approx(s) for s in (0.6, 0.9, 0.7, 0.8, 0.5)].index(r["score"])
        assert (brush_rle_to_mask(r["value"]["rle"], H, W) == masks[k]).all()
    assert image_result(d, [BRUSH], 0.1, max_mask_bytes=0).regions == []


# ------------------------------------------------------- all kinds at once --
def two_piece_scene():
    two_pieces = disk(30, 30, 14) | disk(70, 70, 13)  # one instance in two similar pieces
    masks = [two_pieces, disk(50, 150, 16)]
    return masks, dets(masks, [0.9, 0.8], ["person", "car"])


def test_rectangle_polygon_and_brush_per_detection():
    masks, d = two_piece_scene()
    config = parse_label_config(ALL_KINDS_XML)
    result = image_result(d, config.targets, 0.5)
    summary = [(r["from_name"], r["type"], next(iter(v for k, v in r["value"].items() if k.endswith("labels"))),
                round(r["score"], 3)) for r in result.regions]
    assert summary == [
        ("box", "rectanglelabels", ["Person"], 0.9), ("box", "rectanglelabels", ["Car"], 0.8),
        ("outline", "polygonlabels", ["Person"], 0.9), ("outline", "polygonlabels", ["Person"], 0.9),
        ("outline", "polygonlabels", ["Car"], 0.8),
        ("paint", "brushlabels", ["Person"], 0.9), ("paint", "brushlabels", ["Car"], 0.8)]
    assert result.stats.kept == 7
    pieces = [np.array(r["value"]["points"]) for r in result.regions[2:4]]
    expected = mask_polygons(crop_full_mask(masks[0]))
    assert [p.tolist() for p in pieces] == [polygon_to_percent(e, W, H) for e in expected]
    # the two pieces lie around their own disks: centroids in percent
    assert pieces[0].mean(axis=0) == pytest.approx([15, 30], abs=2) or pieces[0].mean(axis=0) == pytest.approx(
        [35, 70], abs=2)
    assert abs(pieces[0].mean(axis=0)[0] - pieces[1].mean(axis=0)[0]) > 15
    assert (brush_rle_to_mask(result.regions[5]["value"]["rle"], H, W) == masks[0]).all()


def test_region_ids_are_deterministic_and_unique():
    config = parse_label_config(ALL_KINDS_XML)
    a = image_result(two_piece_scene()[1], config.targets, 0.5).regions
    b = image_result(two_piece_scene()[1], config.targets, 0.5).regions  # a new, equal input
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == len(a) == 7
    assert all(isinstance(r["id"], str) and r["id"] for r in a)
    # the same detections under two tags of one kind do not share ids
    twin = RegionTarget("outline2", "img", "image", LABELS, kind="polygonlabels")
    both = image_result(two_piece_scene()[1], [POLY, twin, BRUSH], 0.5).regions
    assert len({r["id"] for r in both}) == len(both) == 3 + 3 + 2


def test_mask_style_reaches_the_polygons():
    _, d = two_piece_scene()
    fine = detections_to_regions(d, POLY, 0.5, style=MaskStyle(tolerance_px=0.25, max_points=1000))
    coarse = detections_to_regions(d, POLY, 0.5, style=MaskStyle(tolerance_px=1.0, max_points=5))
    assert len(fine) == len(coarse) == 3
    assert all(len(r["value"]["points"]) <= 5 for r in coarse)
    assert sum(len(r["value"]["points"]) for r in fine) > sum(len(r["value"]["points"]) for r in coarse)


def test_masks_given_as_crops_of_the_model_path():
    """Detections whose masks come as MaskCrop built from a crop (as the Detector sends them)."""
    mask = disk(40, 60, 12)
    c = crop_full_mask(mask)
    crop = MaskCrop.from_crop(c.x0, c.y0, mask[c.y0:c.y0 + c.height, c.x0:c.x0 + c.width])
    d = Detections(np.array([extent(mask)], np.float32), np.array([0.9], np.float32), ["car"], W, H, masks=[crop])
    (brush,) = detections_to_regions(d, BRUSH, 0.5)
    assert (brush_rle_to_mask(brush["value"]["rle"], H, W) == mask).all()
