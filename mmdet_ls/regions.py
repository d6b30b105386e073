"""Turn detections (pixel boxes, instance masks) into Label Studio regions:
rectangles, polygons and brush masks."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .brush_rle import mask_to_brush_rle
from .label_config import RegionTarget
from .label_mapping import build_label_map, normalize_class_name
from .masks import (
    DEFAULT_MAX_POINTS,
    DEFAULT_TOLERANCE_PX,
    MaskCrop,
    is_valid_polygon,
    mask_polygons,
    polygon_to_percent,
)

# Regions one image may contribute to its task, over all region tags (at most
# 16, see label_config.MAX_REGION_TAGS): the best-scored are kept. A region
# renders to ~350 bytes (names up to 256 characters: ~1.1 KB) plus its mask
# payload (polygon points, brush RLE), which has its own budget, so one image
# answers with at most ~1.1 MB + MAX_MASK_BYTES_PER_IMAGE.
MAX_REGIONS_PER_IMAGE = 1000
MAX_MASK_BYTES_PER_IMAGE = 2_000_000


@dataclass
class Detections:
    """Boxes of one image in the pixel frame of the image as displayed
    (after EXIF orientation): x1, y1, x2, y2; with the instance masks when
    the model predicts them (None when it does not)."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_names: list[str]  # per box
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    masks: list[MaskCrop] | None = None  # per box


@dataclass(frozen=True)
class MaskStyle:
    """How masks become polygons (Postprocess user_config; mmdet_ls/masks.py)."""

    tolerance_px: float = DEFAULT_TOLERANCE_PX
    max_points: int = DEFAULT_MAX_POINTS


class MasksMissing(ValueError):
    """A target needs masks and the detections carry none."""


@dataclass
class RegionStats:
    kept: int = 0
    below_threshold: int = 0
    unmapped: int = 0  # class maps to no label in the config
    invalid: int = 0  # non-finite or empty after clipping to the image
    empty_mask: int = 0  # a mask with no pixel (or no valid polygon) left
    over_cap: int = 0  # past MAX_REGIONS_PER_IMAGE or MAX_MASK_BYTES_PER_IMAGE


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


def mask_payload_bytes(region: dict) -> int:
    """About what a region's mask payload adds to the JSON answer: ~9
    characters per polygon coordinate, ~4 per brush RLE byte."""
    value = region.get("value") or {}
    return 18 * len(value.get("points", ())) + 4 * len(value.get("rle", ()))


REGION_BYTES = 1100  # a region without its mask payload, at most (names up to 256 characters)


def prediction_bytes(regions: list[dict]) -> int:
    """About what a prediction's regions weigh as JSON, at most."""
    return sum(REGION_BYTES + mask_payload_bytes(r) for r in regions)


def _region(target: RegionTarget, detections: Detections, value: dict, score: float, *id_parts) -> dict:
    return {
        "id": region_id(target.from_name, *id_parts),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": target.kind,
        "original_width": int(detections.width),
        "original_height": int(detections.height),
        "image_rotation": 0,
        "value": value,
        "score": score,
    }


def _mask_regions(detections: Detections, i: int, target: RegionTarget, label: str, score: float,
                  style: MaskStyle) -> list[dict]:
    """Polygon (one per piece) or brush regions of detection i; [] if its mask is empty."""
    crop = detections.masks[i]
    if crop.is_empty:
        return []
    if target.kind == "brushlabels":
        rle = mask_to_brush_rle(crop.full(detections.height, detections.width))
        value = {"format": "rle", "rle": rle, "brushlabels": [label]}
        return [_region(target, detections, value, score, int(i), label)]
    regions = []
    for piece, points in enumerate(mask_polygons(crop, style.tolerance_px, style.max_points)):
        percent = polygon_to_percent(points, detections.width, detections.height)
        if not is_valid_polygon(np.asarray(percent)):  # rounding or clipping collapsed it
            continue
        regions.append(_region(target, detections, {"points": percent, "closed": True, "polygonlabels": [label]},
                               score, int(i), piece, label))
    return regions


def detections_to_regions(
    detections: Detections,
    target: RegionTarget,
    score_threshold: float,
    stats: RegionStats | None = None,
    max_regions: int | None = None,
    style: MaskStyle = MaskStyle(),
) -> list[dict]:
    """Regions for one region tag, best score first.

    The tag's `model_score_threshold` overrides `score_threshold`. With
    `max_regions`, detections past that many kept regions are counted in
    `stats.over_cap` and not turned into regions. A mask tag (polygons,
    brush) needs `detections.masks`: MasksMissing otherwise.
    """
    stats = stats if stats is not None else RegionStats()
    if target.needs_masks and detections.masks is None:
        raise MasksMissing(f"the model returned no instance masks for {target.tag}")
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
        if target.needs_masks:
            found = _mask_regions(detections, i, target, label, score, style)
            if not found:
                stats.empty_mask += 1
                continue
            stats.kept += len(found)
            regions.extend(found)
            continue
        stats.kept += 1
        regions.append(_region(target, detections, {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                                    "rectanglelabels": [label]}, score, int(i), x, y, w, h, label))
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
    detections: Detections, targets, score_threshold: float, max_regions: int = MAX_REGIONS_PER_IMAGE,
    style: MaskStyle = MaskStyle(), max_mask_bytes: int = MAX_MASK_BYTES_PER_IMAGE,
) -> ImageResult:
    """Regions of every target, in target order, at most `max_regions` in all
    and at most `max_mask_bytes` of mask payload: past that the best-scored
    are kept (ties: the earlier target)."""
    stats = RegionStats()
    regions = []
    for target in targets:
        regions.extend(detections_to_regions(detections, target, score_threshold, stats, max_regions, style))
    payload = [mask_payload_bytes(r) for r in regions]
    if len(regions) > max_regions or sum(payload) > max_mask_bytes:
        keep, used = [], 0
        for i in sorted(range(len(regions)), key=lambda i: -regions[i]["score"]):
            if len(keep) < max_regions and used + payload[i] <= max_mask_bytes:
                keep.append(i)
                used += payload[i]
        dropped = len(regions) - len(keep)
        regions = [regions[i] for i in sorted(keep)]
        stats.kept -= dropped
        stats.over_cap += dropped
    return ImageResult(regions=regions, stats=stats, timings=dict(detections.timings))
