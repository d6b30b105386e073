"""Turn detections (pixel boxes) into Label Studio rectangle regions."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .label_config import RectangleTarget
from .label_mapping import build_label_map, normalize_class_name

# Regions one image may contribute to its task, over all <RectangleLabels>
# tags (at most 16, see label_config.MAX_RECTANGLE_TAGS): the best-scored are
# kept. A region renders to ~350 bytes (names up to 256 characters: ~1.1 KB),
# so one image answers with at most ~0.35-1.1 MB.
MAX_REGIONS_PER_IMAGE = 1000


@dataclass
class Detections:
    """Boxes of one image in the pixel frame of the image as displayed
    (after EXIF orientation): x1, y1, x2, y2."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_names: list[str]  # per box
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RegionStats:
    kept: int = 0
    below_threshold: int = 0
    unmapped: int = 0  # class maps to no label in the config
    invalid: int = 0  # non-finite or empty after clipping to the image
    over_cap: int = 0  # past MAX_REGIONS_PER_IMAGE


def _clip(v: float) -> float:
    return min(100.0, max(0.0, v))


def box_to_percent(box, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box (x1, y1, x2, y2) -> Label Studio (x, y, width, height) in %,
    clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = _clip(100.0 * x1 / width), _clip(100.0 * y1 / height)
    right, bottom = _clip(100.0 * x2 / width), _clip(100.0 * y2 / height)
    return left, top, max(0.0, right - left), max(0.0, bottom - top)


def region_id(*parts) -> str:
    # Deterministic, so the same prediction twice gives the same ids.
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def detections_to_regions(
    detections: Detections,
    target: RectangleTarget,
    score_threshold: float,
    stats: RegionStats | None = None,
    max_regions: int | None = None,
) -> list[dict]:
    """Regions for one <RectangleLabels> target, best score first.

    The tag's `model_score_threshold` overrides `score_threshold`. With
    `max_regions`, detections past that many kept regions are counted in
    `stats.over_cap` and not turned into regions.
    """
    stats = stats if stats is not None else RegionStats()
    threshold = target.score_threshold if target.score_threshold is not None else score_threshold
    label_map = build_label_map(target)
    regions = []
    order = np.argsort(-np.asarray(detections.scores, dtype=np.float64), kind="stable")
    for i in order:
        score = float(detections.scores[i])
        if not score >= threshold:  # also drops NaN scores
            stats.below_threshold += 1
            continue
        label = label_map.get(normalize_class_name(detections.class_names[i]))
        if label is None:
            stats.unmapped += 1
            continue
        if not np.all(np.isfinite(detections.boxes[i])):
            stats.invalid += 1
            continue
        x, y, w, h = box_to_percent(detections.boxes[i], detections.width, detections.height)
        if w <= 0 or h <= 0:
            stats.invalid += 1  # nothing left inside the image
            continue
        if max_regions is not None and len(regions) >= max_regions:
            stats.over_cap += 1
            continue
        stats.kept += 1
        regions.append(
            {
                "id": region_id(target.from_name, int(i), x, y, w, h, label),
                "from_name": target.from_name,
                "to_name": target.to_name,
                "type": "rectanglelabels",
                "original_width": int(detections.width),
                "original_height": int(detections.height),
                "image_rotation": 0,
                "value": {
                    "x": x,
                    "y": y,
                    "width": w,
                    "height": h,
                    "rotation": 0,
                    "rectanglelabels": [label],
                },
                "score": score,
            }
        )
    return regions


def mean_score(regions: list[dict]) -> float:
    return float(np.mean([r["score"] for r in regions])) if regions else 0.0


@dataclass
class ImageResult:
    """Everything one image contributes to its task's answer."""

    regions: list[dict] = field(default_factory=list)
    stats: RegionStats = field(default_factory=RegionStats)
    timings: dict[str, float] = field(default_factory=dict)


def image_result(
    detections: Detections, targets, score_threshold: float, max_regions: int = MAX_REGIONS_PER_IMAGE
) -> ImageResult:
    """Regions of every target, in target order, at most `max_regions` in all:
    past that the best-scored are kept (ties: the earlier target)."""
    stats = RegionStats()
    regions = []
    for target in targets:
        regions.extend(detections_to_regions(detections, target, score_threshold, stats, max_regions))
    if len(regions) > max_regions:
        best = sorted(range(len(regions)), key=lambda i: -regions[i]["score"])[:max_regions]
        dropped = len(regions) - max_regions
        regions = [regions[i] for i in sorted(best)]
        stats.kept -= dropped
        stats.over_cap += dropped
    return ImageResult(regions=regions, stats=stats, timings=dict(detections.timings))
