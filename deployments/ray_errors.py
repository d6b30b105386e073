"""Ray and Serve errors met while awaiting a deployment call, as per-task
failures, and the one retry a replica that died mid-call earns."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mmdet_ls.failures import TaskFailure

logger = logging.getLogger("ray.serve")

RETRY_MIN_SECONDS_LEFT = 5.0  # a retry with less time left than this would only end as "deadline"


def classify_exception(exc: BaseException) -> TaskFailure:
    """A per-task failure for an infrastructure error (replica died, overload).

    What Ray 2.60 raises when awaiting a DeploymentResponse (measured):
    the replica that runs the call dies -> ActorDiedError (ActorUnavailableError
    while it is unreachable); a replica that produced an argument of the call
    (the loader, for the detector) dies -> RayServeException "...an upstream
    actor died..."; our own code raises -> RayTaskError(<the exception>);
    max_queued_requests exceeded -> BackPressureError. Only "replica_failed"
    is retried (once, by call_with_retry).
    """
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    name = type(exc).__name__
    if isinstance(exc, serve_errors.BackPressureError) or "BackPressure" in name:
        return TaskFailure("overloaded", "the service is at capacity; retry later", retriable=True)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TaskFailure("deadline", "not finished in time for Label Studio; retry later", retriable=True)
    if isinstance(exc, serve_errors.DeploymentUnavailableError):
        return TaskFailure("unavailable", "a deployment of the backend is unavailable; retry later", retriable=True)
    system_errors = tuple(
        getattr(ray_errors, n)
        for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
                  "OutOfMemoryError", "LocalRayletDiedError", "RaySystemError")
        if hasattr(ray_errors, n)
    )
    if isinstance(exc, ray_errors.RayTaskError) and not isinstance(exc, system_errors):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (serve_errors.BackPressureError, *system_errors)):
            return classify_exception(cause)
        cause_name = type(cause).__name__ if cause is not None else name
        return TaskFailure(
            "internal_error", f"internal error while predicting this image ({cause_name}); retry later", retriable=True
        )
    return TaskFailure("replica_failed", f"a serving replica failed ({name}); retry later", retriable=True)


async def _await(response):
    return await response


def _cancel_all(responses: list) -> None:
    for r in responses:
        # cancel() re-raises the call's own error when its routing already
        # failed (e.g. an upstream replica died): that must not escape and
        # turn the whole /predict into a 500.
        try:
            r.cancel()
        except Exception:
            pass


async def call_with_retry(start: Callable[[], list], deadline: float, label: str):
    """The result of the last of the calls `start()` makes (a chain of
    DeploymentResponses), or a TaskFailure. A chain broken by a dying replica
    is started again once, on a healthy one, while time is left. `label`
    names the tasks in log lines ("task <label>: ...")."""
    for attempt in range(2):
        responses = []
        try:
            responses = start()
            return await asyncio.wait_for(_await(responses[-1]), timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            _cancel_all(responses)
            failure = classify_exception(exc)
            if failure.reason in ("replica_failed", "internal_error"):
                logger.warning("task %s: %s", label, type(exc).__name__, exc_info=exc)
            if (failure.reason == "replica_failed" and attempt == 0
                    and deadline - time.monotonic() > RETRY_MIN_SECONDS_LEFT):
                logger.warning("task %s: %s, retrying", label, type(exc).__name__)
                continue
            return failure
