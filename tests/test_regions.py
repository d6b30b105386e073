import numpy as np
import pytest

from mmdet_ls.label_config import LabelSpec, RectangleTarget
from mmdet_ls.regions import Detections, box_to_percent, detections_to_regions, RegionStats

TARGET = RectangleTarget("label", "image", "image", (LabelSpec("Car", ("car", "truck")), LabelSpec("Person", ("person",))))


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
    target = RectangleTarget("label", "image", "image", TARGET.labels, score_threshold=0.95)
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
