"""Per-task failures: values that flow through the graph instead of exceptions,
so one bad task never fails the rest of its batch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskFailure:
    reason: str  # short, stable code used as a metrics label, e.g. "http_404"
    message: str  # what the Label Studio user reads
    retriable: bool = False  # True when trying again later may succeed


class TaskError(Exception):
    """Raised inside pure functions; converted to a TaskFailure at the edge."""

    def __init__(self, reason: str, message: str, retriable: bool = False):
        super().__init__(message)
        self.failure = TaskFailure(reason=reason, message=message, retriable=retriable)
