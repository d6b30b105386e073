"""Postprocess: score threshold and detector-class -> Label Studio label mapping.

At most mmdet_ls.regions.MAX_REGIONS_PER_IMAGE (1000) regions per image, over
all <RectangleLabels> tags; the rest are counted as dropped (why="region_cap").
"""
from __future__ import annotations

from ray import serve

from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import RectangleTarget
from mmdet_ls.regions import Detections, ImageResult, image_result

from . import metrics

DEFAULT_SCORE_THRESHOLD = 0.5


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=64,
    user_config={"score_threshold": DEFAULT_SCORE_THRESHOLD},
)
class Postprocess:
    def __init__(self):
        self.score_threshold = DEFAULT_SCORE_THRESHOLD

    def reconfigure(self, user_config: dict) -> None:
        threshold = float(user_config.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score_threshold must be between 0 and 1, got {threshold}")
        self.score_threshold = threshold

    def get_score_threshold(self) -> float:
        return self.score_threshold

    def to_regions(
        self, detections: Detections | TaskFailure, targets: tuple[RectangleTarget, ...]
    ) -> ImageResult | TaskFailure:
        if isinstance(detections, TaskFailure):
            return detections
        result = image_result(detections, targets, self.score_threshold)
        if result.stats.below_threshold:
            metrics.dropped_detections_total().inc(result.stats.below_threshold, tags={"why": "below_threshold"})
        if result.stats.invalid:
            metrics.dropped_detections_total().inc(result.stats.invalid, tags={"why": "invalid_box"})
        if result.stats.unmapped:
            metrics.dropped_detections_total().inc(result.stats.unmapped, tags={"why": "unmapped"})
        if result.stats.over_cap:  # past MAX_REGIONS_PER_IMAGE
            metrics.dropped_detections_total().inc(result.stats.over_cap, tags={"why": "region_cap"})
        return result
