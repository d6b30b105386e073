import numpy as np
import pytest

from mmdet_ls.label_config import LabelSpec, RegionTarget
from mmdet_ls.regions import Detections, RegionStats, box_to_percent, detections_to_regions

TARGET = RegionTarget("label", "image", "image", (LabelSpec("Car", ("car", "truck")), LabelSpec("Person", ("person",))))


def dets(boxes, scores, names, w=200, h=100):
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), names, w, h)


def test_percent_conversion_non_square():
    assert box_to_percent((20, 10, 120, 60), 200, 100) == pytest.approx((10.0, 10.0, 50.0, 50.0))
    assert box_to_percent((0, 0, 2000, 900), 2000, 900) == pytest.approx((0, 0, 100, 100))


def test_boxes_outside_are_clipped_to_the_image():
    x, y, w, h = box_to_percent((-10, -5, 250, 150), 200, 100)
    assert (x, y, w, h) == pytest.approx((0, 0, 100, 100))


def test_regions_have_label_studio_shape_threshold_and_mapping():
    d = dets(
        [[20, 10, 120, 60], [0, 0, 10, 10], [5, 5, 50, 50], [1, 1, 2, 2]],
        [0.9, 0.3, 0.8, 0.99],
        ["truck", "car", "dog", "person"],
    )
    stats = RegionStats()
    regions = detections_to_regions(d, TARGET, 0.5, stats)
    assert [r["value"]["rectanglelabels"] for r in regions] == [["Person"], ["Car"]]  # best score first
    car = regions[1]
    assert set(car) == {"id", "from_name", "to_name", "type", "original_width", "original_height",
                        "image_rotation", "value", "score"}
    assert car["type"] == "rectanglelabels" and car["from_name"] == "label" and car["to_name"] == "image"
    assert (car["original_width"], car["original_height"], car["image_rotation"]) == (200, 100, 0)
    assert car["value"]["x"] == pytest.approx(10) and car["value"]["width"] == pytest.approx(50)
    assert car["value"]["rotation"] == 0 and car["score"] == pytest.approx(0.9)
    assert (stats.kept, stats.below_threshold, stats.unmapped) == (2, 1, 1)


def test_tag_threshold_overrides_global():
    target = RegionTarget("label", "image", "image", TARGET.labels, score_threshold=0.95)
    d = dets([[0, 0, 10, 10], [0, 0, 20, 20]], [0.9, 0.97], ["car", "car"])
    assert [r["score"] for r in detections_to_regions(d, target, 0.1)] == [pytest.approx(0.97)]


def test_region_ids_are_deterministic_and_unique():
    d = dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.9], ["car", "car"])
    a = detections_to_regions(d, TARGET, 0.5)
    b = detections_to_regions(d, TARGET, 0.5)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == 2


def test_non_finite_and_outside_boxes_are_dropped_and_counted():
    d = dets([[-np.inf, 0, 10, np.inf], [300, 300, 400, 400], [10, 10, 20, 20]], [1.0, 0.9, np.nan], ["car"] * 3)
    stats = RegionStats()
    assert detections_to_regions(d, TARGET, 0.0, stats) == []
    assert (stats.invalid, stats.below_threshold) == (2, 1)


def test_regions_are_capped_per_image_over_all_tags_best_scores_kept():
    from mmdet_ls.regions import MAX_REGIONS_PER_IMAGE, image_result

    assert MAX_REGIONS_PER_IMAGE == 1000
    n = 100
    boxes = [[i % 150, 0, i % 150 + 20, 50] for i in range(n)]
    scores = [0.5 + 0.004 * i for i in range(n)]  # 0.5 .. 0.896, all above the threshold
    d = dets(boxes, scores, ["car"] * n)
    targets = [RegionTarget(f"label{t}", "image", "image", TARGET.labels) for t in range(16)]
    result = image_result(d, targets, 0.1)  # 16 tags x 100 detections = 1600 candidate regions
    assert len(result.regions) == 1000
    assert (result.stats.kept, result.stats.over_cap) == (1000, 600)
    kept_scores = sorted((r["score"] for r in result.regions), reverse=True)
    # The best 1000 of 1600: every tag's top 62 or 63 detections (scores tie across tags).
    assert min(kept_scores) >= sorted((s for s in np.float32(scores) for _ in range(16)), reverse=True)[999]
    # Still grouped by tag, best first inside each tag.
    names = [r["from_name"] for r in result.regions]
    assert names == sorted(names, key=lambda name: int(name[5:]))
    # Under the cap nothing changes.
    small = image_result(d, targets[:3], 0.1)
    assert len(small.regions) == 300 and small.stats.over_cap == 0


def test_detections_to_regions_stops_at_max_regions():
    d = dets([[0, 0, 10, 10]] * 5, [0.9, 0.8, 0.7, 0.6, 0.95], ["car"] * 5)
    stats = RegionStats()
    regions = detections_to_regions(d, TARGET, 0.5, stats, max_regions=2)
    assert [r["score"] for r in regions] == [pytest.approx(0.95), pytest.approx(0.9)]
    assert (stats.kept, stats.over_cap) == (2, 3)
