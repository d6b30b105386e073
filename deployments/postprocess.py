"""Postprocess: score threshold, detector-class -> Label Studio label mapping,
and instance masks -> polygons / brush RLE (CPU work kept off the Detector).

At most mmdet_ls.regions.MAX_REGIONS_PER_IMAGE (1000) regions and
MAX_MASK_BYTES_PER_IMAGE of mask payload per image, over all region tags; the
rest are counted as dropped (why="region_cap").
"""
from __future__ import annotations

from ray import serve

from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import RegionTarget
from mmdet_ls.regions import Detections, ImageResult, MasksMissing, MaskStyle, image_result
from mmdet_ls.settings import check_user_config, polygon_settings, score_threshold

from . import metrics


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Postprocess:
    def __init__(self):
        self.score_threshold = score_threshold(None)  # SCORE_THRESHOLD, else 0.5, until a user_config says
        self.mask_style = MaskStyle()

    def reconfigure(self, user_config: dict | None) -> None:
        """score_threshold and the polygon settings from this deployment's
        user_config, applied live."""
        user_config = check_user_config("Postprocess", user_config)
        self.score_threshold = score_threshold(user_config)
        self.mask_style = MaskStyle(*polygon_settings(user_config))

    def to_regions_group(
        self, detections: list[Detections | TaskFailure], targets: list[tuple[RegionTarget, ...]]
    ) -> list[ImageResult | TaskFailure]:
        """Several images per call (fewer hops per image)."""
        return [self.to_regions(d, t) for d, t in zip(detections, targets, strict=True)]

    def to_regions(
        self, detections: Detections | TaskFailure, targets: tuple[RegionTarget, ...]
    ) -> ImageResult | TaskFailure:
        if isinstance(detections, TaskFailure):
            return detections
        try:
            result = image_result(detections, targets, self.score_threshold, style=self.mask_style)
        except MasksMissing as exc:  # the config said masks, the model gave none: never an empty region list
            return TaskFailure("no_masks", f"{exc}; serve an instance-segmentation model for this tag")
        if result.stats.below_threshold:
            metrics.dropped_detections_total().inc(result.stats.below_threshold, tags={"why": "below_threshold"})
        if result.stats.invalid:
            metrics.dropped_detections_total().inc(result.stats.invalid, tags={"why": "invalid_box"})
        if result.stats.empty_mask:
            metrics.dropped_detections_total().inc(result.stats.empty_mask, tags={"why": "empty_mask"})
        if result.stats.unmapped:
            metrics.dropped_detections_total().inc(result.stats.unmapped, tags={"why": "unmapped"})
        if result.stats.over_cap:  # past MAX_REGIONS_PER_IMAGE
            metrics.dropped_detections_total().inc(result.stats.over_cap, tags={"why": "region_cap"})
        return result
