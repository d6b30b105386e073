"""Image jobs travel through the graph several per call.

A handle call costs about as much CPU as decoding a small image, and each
image makes three (loader, detector, postprocess). The ingress therefore
queues the images of all its requests and sends what is queued as groups:
one call per deployment per group. Nothing waits for company: a lone image
leaves at once; groups form from what queued while earlier groups were in
flight (a /predict with many tasks, many annotators at once). Each source
has at most max_inflight_images / IMAGES_PER_BUSY_GROUP calls in flight, so
under many concurrent one-task requests images queue briefly and then
travel together, instead of each paying three calls. Each image still
succeeds or fails on its own, and answers by its own deadline.

A group answers when its slowest image is done, so a group holds images of
one source only (one image server, or image_dir): a slow or stalling server
delays its own images, not those of others. Deployment autoscaling counts
calls, so a Detector's ongoing requests are groups (1 to 16 images).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mmdet_ls.failures import TaskFailure
from mmdet_ls.log_text import short_id

from .ray_errors import call_with_retry, classify_exception

logger = logging.getLogger("ray.serve")

# Images per call between deployments. A group answers when its last image
# is done, so on a CPU (images run one after another) a group's images wait
# for each other: groups are split evenly over the free slots, and capped.
MAX_IMAGES_PER_CALL = 16
# Each source has max_inflight_images / this calls in flight at most, and its
# queue is split over them, so with a long queue a group holds this many
# images on average (the unit the cluster config's autoscaling targets count
# in), and fewer when the queue is short.
IMAGES_PER_BUSY_GROUP = 8
MAX_SCAN = 256  # queued images looked at to fill one group (mixed sources)


@dataclass
class _Queued:
    item: object  # what the send function gets for this image
    source: str  # images of one source travel together
    task_id: object
    deadline: float
    future: asyncio.Future = field(repr=False)


class GroupDispatcher:
    """`await submit(item, source, task_id, deadline)` -> the image's result or TaskFailure.

    `send(items)` starts one chain of deployment calls for a group and
    returns its DeploymentResponses, the last one giving a list with one
    result per item. At most `max_inflight_images` images are in flight.
    """

    def __init__(self, send: Callable[[list], list], max_inflight_images: int,
                 max_images_per_call: int = MAX_IMAGES_PER_CALL):
        self._send = send
        self._max_per_call = max(1, max_images_per_call)
        self._queue: deque[_Queued] = deque()
        self._images_in_flight = 0
        self._calls_in_flight: dict[str, int] = {}  # per source
        self._pump_scheduled = False
        self._scan_saw_given_up = False  # the last _take met images that gave up while queued
        self.set_max_inflight(max_inflight_images)
        self._running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def set_max_inflight(self, max_inflight_images: int) -> None:
        """The in-flight bound (the JobRunner follows the Detectors' capacity)."""
        self._max_images = max(1, max_inflight_images)
        self._calls_per_source = max(1, math.ceil(self._max_images / IMAGES_PER_BUSY_GROUP))
        if self._queue:  # a higher bound may let queued images go
            self._schedule_pump()

    async def submit(self, item, source: str, task_id, deadline: float):
        queued = _Queued(item, source, task_id, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._schedule_pump()
        try:
            # shield: this image giving up must not cancel its group-mates.
            return await asyncio.wait_for(asyncio.shield(queued.future),
                                          timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return classify_exception(asyncio.TimeoutError())

    def _schedule_pump(self) -> None:
        # After the other tasks ready in this loop turn have queued their
        # images too (asyncio.gather starts a /predict's jobs in one turn).
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        now = time.monotonic()
        while self._queue and self._images_in_flight < self._max_images:
            group = self._take(now)
            if not group:
                if self._scan_saw_given_up and self._drop_given_up(now):
                    continue  # the scanned window held images that gave up: look again
                break
            source = group[0].source
            self._calls_in_flight[source] = self._calls_in_flight.get(source, 0) + 1
            self._images_in_flight += len(group)
            task = asyncio.ensure_future(self._run(group))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, now: float) -> list[_Queued]:
        """The next group: queued images of the first queued image whose source
        has a call slot free, in order. A source's queue is split evenly over
        its free slots (a long queue: groups of about IMAGES_PER_BUSY_GROUP; a
        short one with every slot free: groups of one, so images overlap)."""
        source, queued_of_source, scanned = None, 0, 0
        self._scan_saw_given_up = False  # nothing to drop otherwise: _pump skips the re-queue
        for queued in self._queue:
            if scanned >= MAX_SCAN:
                break
            scanned += 1
            if queued.future.done() or queued.deadline <= now:
                self._scan_saw_given_up = True
                continue
            if source is None and self._calls_in_flight.get(queued.source, 0) < self._calls_per_source:
                source = queued.source
            queued_of_source += queued.source == source
        if source is None:
            return []
        free_calls = self._calls_per_source - self._calls_in_flight.get(source, 0)
        size = min(self._max_per_call, self._max_images - self._images_in_flight,
                   math.ceil(queued_of_source / free_calls))
        group: list[_Queued] = []
        rest: deque[_Queued] = deque()
        scanned = 0
        while self._queue and len(group) < size and scanned < MAX_SCAN:
            scanned += 1
            queued = self._queue.popleft()
            if queued.future.done() or queued.deadline <= now:  # gave up while queued
                continue
            (group if queued.source == source else rest).append(queued)
        self._queue.extendleft(reversed(rest))
        return group

    def _drop_given_up(self, now: float) -> int:
        """Forget the images that gave up among the first MAX_SCAN queued."""
        window = [self._queue.popleft() for _ in range(min(MAX_SCAN, len(self._queue)))]
        live = [q for q in window if not (q.future.done() or q.deadline <= now)]
        self._queue.extendleft(reversed(live))
        return len(window) - len(live)

    async def _run(self, group: list[_Queued]) -> None:
        try:
            label = (short_id(group[0].task_id) if len(group) == 1
                     else f"{short_id(group[0].task_id)} and {len(group) - 1} more")
            outcome = await call_with_retry(lambda: self._send([q.item for q in group]),
                                            max(q.deadline for q in group), label)
            if isinstance(outcome, TaskFailure):
                outcomes = [outcome] * len(group)
            elif isinstance(outcome, list) and len(outcome) == len(group):
                outcomes = outcome
            else:  # never expected: a deployment answered the wrong shape
                logger.error("group of %d images got %s back", len(group), type(outcome).__name__)
                outcomes = [TaskFailure("internal_error", "internal error while predicting this image; retry later",
                                        retriable=True)] * len(group)
            for queued, result in zip(group, outcomes, strict=True):
                if not queued.future.done():
                    queued.future.set_result(result)
        except BaseException as exc:  # the futures must resolve whatever happens
            failure = classify_exception(exc)
            for queued in group:
                if not queued.future.done():
                    queued.future.set_result(failure)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._images_in_flight -= len(group)
            source = group[0].source
            self._calls_in_flight[source] -= 1
            if not self._calls_in_flight[source]:
                del self._calls_in_flight[source]
            self._schedule_pump()
