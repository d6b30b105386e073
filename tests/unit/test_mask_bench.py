"""bench/mask_bench.py's pure helpers: region counts of real mask regions,
mask bytes between deployments, pooling and the ratio summary. The script
itself (model, `serve run`) is run by hand; see its docstring."""
import numpy as np
import pytest

from bench import mask_bench as mb
from mmdet_ls.label_config import parse_label_config
from mmdet_ls.masks import crop_full_mask
from mmdet_ls.regions import Detections, image_result
from tests.toy_detector.scenes import make_scene_with_masks


def scene_detections(seed: int = mb.SEED0) -> tuple[Detections, list[dict]]:
    """The scene's true objects as detections, with their masks cropped as the Detector ships them."""
    _, objects = make_scene_with_masks(seed, mb.WIDTH, mb.HEIGHT)
    return Detections(
        boxes=np.array([o["bbox"] for o in objects], dtype=np.float32).reshape(-1, 4),
        scores=np.full(len(objects), 0.9, dtype=np.float32),
        class_names=[o["label"] for o in objects], width=mb.WIDTH, height=mb.HEIGHT,
        masks=[crop_full_mask(o["mask"]) for o in objects]), objects


def test_the_mask_config_adds_polygons_and_brushes_to_the_same_boxes():
    detections, objects = scene_detections()
    counts = {path: mb.region_counts(image_result(detections, parse_label_config(xml).targets, 0.5).regions)
              for path, xml in mb.LABEL_CONFIGS.items()}
    n = len(objects)
    assert counts["box"] == {"rectanglelabels": n, "total": n}
    assert counts["mask"]["rectanglelabels"] == counts["mask"]["brushlabels"] == n
    assert counts["mask"]["polygonlabels"] >= n  # one per piece
    assert counts["mask"]["total"] == sum(v for k, v in counts["mask"].items() if k != "total")


def test_mask_traffic_counts_the_shipped_crops_against_full_masks():
    detections, objects = scene_detections()
    row = mb.mask_traffic(detections.masks, mb.WIDTH, mb.HEIGHT)
    n = len(objects)
    assert row["instances"] == n and row["full_bool_bytes"] == n * 640 * 480 and row["full_bits_bytes"] == n * 38400
    # a scene's box is its mask's extent: each crop is that many pixels, bit-packed
    assert row["crop_bytes"] == sum(-(-(x2 - x1) * (y2 - y1) // 8) for x1, y1, x2, y2 in (o["bbox"] for o in objects))
    assert 0 < row["crop_bytes"] < row["full_bits_bytes"]
    totals = mb.traffic_totals([row, mb.mask_traffic([], mb.WIDTH, mb.HEIGHT)])
    assert totals["images"] == 2 and totals["instances"] == n
    assert totals["crop_over_full_bool"] == pytest.approx(row["crop_bytes"] / row["full_bool_bytes"])
    assert mb.traffic_totals([mb.mask_traffic(None, 10, 10)])["crop_over_full_bool"] is None  # no instance at all


def test_counts_add_and_rates_pool_over_runs():
    assert mb.add_counts({"a": 1, "total": 1}, {"b": 2, "total": 2}) == {"a": 1, "b": 2, "total": 3}
    assert mb.pool_rates([{"images": 10, "seconds": 1.0}, {"images": 10, "seconds": 3.0}])["images_per_s"] == 5.0


def test_ratio_summary_per_shape():
    raw = {"box": 20.0, "mask": 10.0}
    summary = mb.ratio_summary(raw, {"predict_n": {"box": 19.0, "mask": 9.0},
                                     "one_task_calls": {"box": 18.0, "mask": 9.5}})
    assert summary["predict_n"] == {"box_ratio": 0.95, "mask_ratio": 0.9, "ratio_gap": -0.05, "within_0_05": True}
    assert summary["one_task_calls"]["ratio_gap"] == pytest.approx(0.05) and summary["one_task_calls"]["within_0_05"]
    worse = mb.ratio_summary(raw, {"predict_n": {"box": 19.0, "mask": 8.9}})
    assert not worse["predict_n"]["within_0_05"]
