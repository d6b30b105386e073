"""Split a /predict call into image jobs and assemble the per-task answers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .failures import TaskFailure
from .label_config import ParsedLabelConfig, RectangleTarget
from .regions import ImageResult, mean_score


@dataclass(frozen=True)
class ImageJob:
    """One image of one task, with the <RectangleLabels> tags that annotate it."""

    task_index: int
    task_id: Any
    value: Any  # the image URL/path from task["data"]
    targets: tuple[RectangleTarget, ...]


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
    return {
        "error": failure.message,
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
) -> list[dict]:
    """One item per task, in task order."""
    regions: dict[int, list[dict]] = {}
    failures = dict(task_failures)
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, TaskFailure):
            failures.setdefault(job.task_index, outcome)
        else:
            regions.setdefault(job.task_index, []).extend(outcome.regions)
    items = []
    for index in range(n_tasks):
        if index in failures:
            items.append(failure_item(failures[index], model_version))
        else:
            items.append(prediction_item(regions.get(index, []), model_version))
    return items
