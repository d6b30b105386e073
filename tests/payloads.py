"""What the tests send the service: one label config, one task, one /predict call.

A module that needs another label config on purpose (other labels or class
mappings) keeps its own and says why; everything else uses these.
"""
from __future__ import annotations

import requests

# The toy detector's classes (car, airplane, person) mapped to two Label Studio labels.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="Vehicle" predicted_values="car,airplane,truck"/><Label value="Person" predicted_values="person"/>'
    "</RectangleLabels></View>"
)
LABELS = {"Vehicle", "Person"}


def task(task_id, image) -> dict:
    """A task with one image: the fields the service reads."""
    return {"id": task_id, "data": {"image": image}}


def ls_task(task_id, image) -> dict:
    """The same task as Label Studio sends it, with its empty meta, annotations and predictions."""
    return {**task(task_id, image), "meta": {}, "annotations": [], "predictions": []}


def predict_body(tasks: list, *, label_config: str = LABEL_CONFIG, project: str = "1.1", **fields) -> dict:
    """A /predict body; `fields` adds others Label Studio sends (e.g. params)."""
    return {"tasks": tasks, "project": project, "label_config": label_config, **fields}


def predict(url: str, tasks: list, *, label_config: str = LABEL_CONFIG, project: str = "1.1", auth=None,
            timeout: float = 100, **fields) -> requests.Response:
    """POST /predict; the answer is not checked."""
    return requests.post(f"{url}/predict", json=predict_body(tasks, label_config=label_config, project=project,
                                                             **fields), auth=auth, timeout=timeout)
