"""Postprocess: score threshold and detector-class -> Label Studio label mapping.

At most mmdet_ls.regions.MAX_REGIONS_PER_IMAGE (1000) regions per image, over
all <RectangleLabels> tags; the rest are counted as dropped (why="region_cap").
"""
from __future__ import annotations

from ray import serve

from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import RectangleTarget
from mmdet_ls.regions import Detections, ImageResult, image_result
from mmdet_ls.settings import check_user_config, score_threshold

from . import metrics


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Postprocess:
    def __init__(self):
        self.score_threshold = score_threshold(None)  # SCORE_THRESHOLD, else 0.5, until a user_config says

    def reconfigure(self, user_config: dict | None) -> None:
        """score_threshold from this deployment's user_config, applied live."""
        self.score_threshold = score_threshold(check_user_config("Postprocess", user_config))

    def to_regions_group(
        self, detections: list[Detections | TaskFailure], targets: list[tuple[RectangleTarget, ...]]
    ) -> list[ImageResult | TaskFailure]:
        """Several images per call (fewer hops per image)."""
        return [self.to_regions(d, t) for d, t in zip(detections, targets, strict=True)]

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
