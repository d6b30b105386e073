"""Split a /predict call into image jobs and assemble the per-task answers.

Bounds on what one answer carries (with label_config.MAX_REGION_TAGS and
regions.MAX_REGIONS_PER_IMAGE):

- MAX_ERROR_CHARS: an error item's message is cut to this many characters
  (messages quote URLs and task ids from the request, which may be 64 KiB).
- MAX_REGIONS_PER_RESPONSE: regions in one /predict answer, over all tasks; a
  task whose regions do not fit in what is left gets a retriable
  "too_many_regions" error item instead (ask again for fewer tasks).
- MAX_MASK_BYTES_PER_RESPONSE: the same for mask payloads (polygon points,
  brush RLE; regions.mask_payload_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .failures import TaskFailure
from .label_config import ParsedLabelConfig, RegionTarget
from .regions import ImageResult, mask_payload_bytes, mean_score

MAX_ERROR_CHARS = 500
MAX_REGIONS_PER_RESPONSE = 100_000
MAX_MASK_BYTES_PER_RESPONSE = 32_000_000


@dataclass(frozen=True)
class ImageJob:
    """One image of one task, with the <RectangleLabels> tags that annotate it."""

    task_index: int
    task_id: Any
    value: Any  # the image URL/path from task["data"]
    targets: tuple[RegionTarget, ...]


def image_source(value: str) -> str:
    """Which server an image comes from, for grouping images that share a fate
    (not a security decision: the loader parses and checks every URL itself):
    scheme://host[:port] of a URL, "inline" for data: URIs, else "relative"
    (a Label Studio path, served from image_dir or Label Studio)."""
    head = value[:2048].strip()
    scheme, sep, rest = head.partition("://")
    if sep and scheme.isascii() and scheme.isalnum():
        return f"{scheme.lower()}://{rest.split('/', 1)[0].split('?', 1)[0].split('#', 1)[0].lower()}"
    return "inline" if head[:5].lower() == "data:" else "relative"


def plan_jobs(tasks: list, config: ParsedLabelConfig) -> tuple[list[ImageJob], dict[int, TaskFailure]]:
    """Jobs to run, and failures for tasks that are malformed on their own."""
    jobs: list[ImageJob] = []
    failures: dict[int, TaskFailure] = {}
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            failures[index] = TaskFailure("bad_task", f"task must be a JSON object, got {type(task).__name__}")
            continue
        data = task.get("data")
        if not isinstance(data, dict):
            failures[index] = TaskFailure("bad_task", 'task has no "data" object')
            continue
        task_jobs = []
        for key in config.image_keys:
            if key not in data:
                failures[index] = TaskFailure(
                    "bad_task",
                    f'task data has no "{key}" key (the label config reads the image from ${key})',
                )
                break
            value = data[key]
            if not isinstance(value, str) or not value.strip():
                failures[index] = TaskFailure(
                    "bad_task", f'task data "{key}" must be an image URL string, got {type(value).__name__}'
                )
                break
            targets = tuple(t for t in config.targets if t.image_key == key)
            task_jobs.append(ImageJob(index, task.get("id"), value, targets))
        if index not in failures:
            jobs.extend(task_jobs)
    return jobs, failures


def prediction_item(regions: list[dict], model_version: str) -> dict:
    return {"result": regions, "score": mean_score(regions), "model_version": model_version}


def failure_item(failure: TaskFailure, model_version: str) -> dict:
    """The item for a task that got no prediction.

    Label Studio stores a prediction only for items with a non-empty
    "result"; an item without one is skipped, so the task stays unpredicted
    and "Retrieve predictions" tries it again later. The error travels in the
    item for logs and API clients (Label Studio ignores unknown keys).
    """
    message = failure.message
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return {
        "error": message,
        "error_reason": failure.reason,
        "retriable": failure.retriable,
        "model_version": model_version,
    }


def assemble_results(
    n_tasks: int,
    jobs: list[ImageJob],
    outcomes: list[ImageResult | TaskFailure],
    task_failures: dict[int, TaskFailure],
    model_version: str,
    max_regions: int = MAX_REGIONS_PER_RESPONSE,
    max_mask_bytes: int = MAX_MASK_BYTES_PER_RESPONSE,
) -> list[dict]:
    """One item per task, in task order, with at most `max_regions` regions
    and `max_mask_bytes` of mask payload in all: a task whose regions do not
    fit in what is left gets a retriable "too_many_regions" error item (later,
    smaller tasks may still fit)."""
    regions: dict[int, list[dict]] = {}
    failures = dict(task_failures)
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, TaskFailure):
            failures.setdefault(job.task_index, outcome)
        else:
            regions.setdefault(job.task_index, []).extend(outcome.regions)
    items = []
    left, bytes_left = max_regions, max_mask_bytes
    for index in range(n_tasks):
        if index in failures:
            items.append(failure_item(failures[index], model_version))
            continue
        task_regions = regions.get(index, [])
        task_bytes = sum(mask_payload_bytes(r) for r in task_regions)
        if len(task_regions) > left or task_bytes > bytes_left:
            items.append(failure_item(too_many_regions(max_regions, max_mask_bytes), model_version))
            continue
        left -= len(task_regions)
        bytes_left -= task_bytes
        items.append(prediction_item(task_regions, model_version))
    return items


def too_many_regions(max_regions: int, max_mask_bytes: int = MAX_MASK_BYTES_PER_RESPONSE) -> TaskFailure:
    return TaskFailure(
        "too_many_regions",
        f"too many regions in one response (at most {max_regions}, and {max_mask_bytes // 1_000_000} MB of mask "
        "data); this task was not predicted, ask again for it in a call with fewer tasks",
        retriable=True,
    )


def too_many_tasks(limit: int) -> TaskFailure:
    """What every task past the first `limit` of one call gets: one short
    message shared by all, so each costs the same few bytes."""
    return TaskFailure("too_many_tasks", f"one call takes {limit} tasks; ask again", retriable=True)
