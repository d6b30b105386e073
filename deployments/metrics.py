"""Our Prometheus metrics, recorded through Ray's metrics API.

Ray exports them (prefixed `ray_`) on every node's metrics port; the
ingress's GET /metrics gathers those lines from all nodes.
"""
from __future__ import annotations

from functools import lru_cache

from ray.serve import metrics

PREFIX = "mmdet_ls_"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]


@lru_cache(maxsize=None)
def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> metrics.Counter:
    return metrics.Counter(PREFIX + name, description=description, tag_keys=tag_keys or None)


@lru_cache(maxsize=None)
def histogram(name: str, description: str, buckets: tuple, tag_keys: tuple[str, ...] = ()) -> metrics.Histogram:
    return metrics.Histogram(
        PREFIX + name, description=description, boundaries=list(buckets), tag_keys=tag_keys or None
    )


def tasks_total():
    return counter("tasks", "Tasks answered, by outcome (predicted or failed).", ("outcome",))


def task_failures_total():
    return counter("task_failures", "Tasks answered with an error, by reason.", ("reason",))


def images_total():
    return counter("images", "Images loaded, by source (local, label_studio, remote, inline).", ("source",))


def dropped_detections_total():
    return counter("dropped_detections", "Detections not returned, by why (below_threshold, unmapped, invalid_box, region_cap).", ("why",))


def batch_size_histogram():
    return histogram("model_batch_size", "Images per model call in the detector.", tuple(BATCH_BUCKETS))


def stage_seconds():
    return histogram(
        "stage_seconds", "Latency per stage (load, decode, queue, model, request).", tuple(LATENCY_BUCKETS), ("stage",)
    )
