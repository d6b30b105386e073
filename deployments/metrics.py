"""Our Prometheus metrics, recorded through Ray's metrics API.

Ray exports them (prefixed `ray_`) on every node's metrics port; the
ingress's GET /metrics gathers those lines from all nodes
(collect_prometheus_text).
"""
from __future__ import annotations

import logging
from collections import Counter
from functools import cache

import requests
from ray.serve import metrics

from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import too_many_tasks

logger = logging.getLogger("ray.serve")

PREFIX = "mmdet_ls_"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]


@cache
def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> metrics.Counter:
    return metrics.Counter(PREFIX + name, description=description, tag_keys=tag_keys or None)


@cache
def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> metrics.Gauge:
    return metrics.Gauge(PREFIX + name, description=description, tag_keys=tag_keys or None)


@cache
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
    return counter("dropped_detections",
                   "Detections not returned, by why (below_threshold, unmapped, invalid_box, empty_mask, "
                   "region_cap).", ("why",))


def batch_size_histogram():
    return histogram("model_batch_size", "Images per model call in the detector.", tuple(BATCH_BUCKETS))


def stage_seconds():
    return histogram(
        "stage_seconds", "Latency per stage (load, decode, queue, model, request).", tuple(LATENCY_BUCKETS), ("stage",)
    )


def record_predict(
    results: list[dict], outcomes: list, request_s: float, overflow: tuple[int, int] = (0, 0)
) -> None:
    """Metrics and one log line for a /predict answer; `overflow`: (tasks past
    the limit, the limit)."""
    # One increment per label value, not per task (each costs a metrics call).
    reasons = Counter(item["error_reason"] for item in results if "error" in item)
    n_failed = sum(reasons.values())
    if len(results) > n_failed:
        tasks_total().inc(len(results) - n_failed, tags={"outcome": "predicted"})
    if n_failed:
        tasks_total().inc(n_failed, tags={"outcome": "failed"})
    for reason, n in reasons.items():
        task_failures_total().inc(n, tags={"reason": reason})
    n_overflow, limit = overflow
    if n_overflow:
        tasks_total().inc(n_overflow, tags={"outcome": "failed"})
        task_failures_total().inc(n_overflow, tags={"reason": "too_many_tasks"})
    stages = stage_seconds()
    stages.observe(request_s, tags={"stage": "request"})
    for outcome in outcomes:
        if isinstance(outcome, ImageResult):
            for name, seconds in outcome.timings.items():
                stages.observe(seconds, tags={"stage": name.removesuffix("_s")})
    # One line per request, not per task: a 10,000-task request of bad
    # tasks must not write 10,000 lines (the loader logs each image it could not load).
    failed = Counter(item["error_reason"] for item in results if "error" in item)
    examples = {}
    if n_overflow:
        failed["too_many_tasks"] += n_overflow
        examples["too_many_tasks"] = too_many_tasks(limit).message
    if failed:
        for item in results:
            if "error" in item:
                examples.setdefault(item["error_reason"], item["error"][:200])
        logger.warning(
            "%d of %d tasks answered with an error: %s", sum(failed.values()), len(results) + n_overflow,
            "; ".join(f"{reason} x{n} (e.g. {examples[reason]})" for reason, n in failed.most_common(10)),
        )


JOB_STATES = ("queued", "listing", "running", "cancelling", "done", "failed", "cancelled", "lost")
JOB_TASK_OUTCOMES = ("done", "failed", "written", "skipped")
_job_counts_seen: dict[str, dict[str, int]] = {}  # job id -> counts already added to the counters


def record_jobs(records) -> None:
    """Job gauges (jobs by state, tasks queued) and counters (job tasks by
    outcome), from the JobRunner's records: called on each job change."""
    records = list(records)
    states = Counter(r.state for r in records)
    jobs_gauge = gauge("jobs", "Pre-annotation jobs the JobRunner knows, by state.", ("state",))
    for state in JOB_STATES:
        jobs_gauge.set(states.get(state, 0), tags={"state": state})
    queued = sum(max(0, (r.total or 0) - r.done - r.failed - r.skipped) for r in records if not r.finished)
    gauge("job_tasks_queued", "Tasks that running jobs still have to predict.").set(queued)
    tasks = counter("job_tasks", "Tasks finished by jobs, by outcome (done, failed, written, skipped).", ("outcome",))
    for record in records:
        seen = _job_counts_seen.setdefault(record.id, {})
        for outcome in JOB_TASK_OUTCOMES:
            now = getattr(record, outcome)
            if now > seen.get(outcome, 0):
                tasks.inc(now - seen.get(outcome, 0), tags={"outcome": outcome})
                seen[outcome] = now
    for job_id in set(_job_counts_seen) - {r.id for r in records}:
        del _job_counts_seen[job_id]


def collect_prometheus_text(prefix: str = PREFIX, timeout_s: float = 2.0) -> str:
    """Our metric families from every alive node's Ray metrics endpoint."""
    import ray

    lines: list[str] = []
    seen_meta: set[str] = set()
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            text = requests.get(url, timeout=timeout_s).text
        except requests.RequestException:
            lines.append(f"# node {node['NodeManagerAddress']} did not answer")
            continue
        for line in text.splitlines():
            if prefix not in line:
                continue
            if line.startswith("#"):
                if line in seen_meta:
                    continue
                seen_meta.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"
