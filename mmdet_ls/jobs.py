"""Pre-annotation jobs: predict many Label Studio tasks and write the
predictions back through Label Studio's API (no Ray here; the JobRunner
deployment wires this to the graph).

Label Studio's stored predictions are the truth about what is done. A job
lists only tasks without a prediction of its model_version (pages by task
id, so the list does not shift while the job writes), and checks again
right before each write: a job re-run after any crash resumes where Label
Studio says it stopped, and a task gets at most one prediction of a model
version from us. Claims keep two of our own paths (a /predict in flight, a
background job, a bulk job) from predicting the same task at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field

from .label_config import LabelConfigError, ModelOutputs, ParsedLabelConfig
from .labelstudio_api import LabelStudioAPIError
from .projects import cached_label_config
from .regions import prediction_bytes

logger = logging.getLogger("ray.serve")

TERMINAL_STATES = frozenset({"done", "failed", "cancelled", "lost"})
MAX_FAILURES_KEPT = 100  # per job; the count goes on, the list stops
WRITE_RETRIES = 3  # a write Label Studio answered with 5xx (or not at all) is tried this many more times
WRITE_EVERY_S = 2.0  # predictions wait at most this long for company before a write
# Predictions per import call at most. Each import makes Label Studio recount
# the whole project (about 1 s at 20,000 tasks), so a fast model's writes
# must grow with its backlog rather than queue up behind small calls.
MAX_WRITE_CHUNK = 500
# Bytes of predictions one import carries at most, about (regions.prediction_bytes):
# mask payloads make a prediction up to ~3 MB, so chunks are cut by size too.
MAX_WRITE_CHUNK_BYTES = 16 * 1024 * 1024
# A claim outlives its end this long: a /predict's, until Label Studio has
# stored the answer; a job's, until a click Label Studio listed before the
# write has come and gone.
LINGER_S = 120.0

# Messages that say how a job resumes, by kind (a job lost with its replica).
RESUME_HINT = {
    "bulk": "start it again (make annotate PROJECT={project}, or POST /jobs): only tasks without a "
            "prediction of this model version are predicted, so it resumes where it stopped",
    "background": "select the tasks and click Retrieve predictions again: only tasks without a "
                  "prediction of this model version are sent",
    "new_tasks": "the next sweep (or a new job: make annotate PROJECT={project}) predicts what is left",
}


@dataclass
class JobRecord:
    """What GET /jobs/{id} shows; saved on every state change."""

    id: str
    kind: str  # bulk, background, new_tasks
    project: int
    model_version: str
    selection: str = "all"  # "all" (the project) or "<n> tasks"
    state: str = "queued"  # queued, listing, running, cancelling, then a terminal state
    total: int | None = None  # tasks to predict, once known
    done: int = 0  # tasks holding a prediction of this model version (written, or found already there)
    failed: int = 0
    written: int = 0  # predictions this job wrote
    skipped: int = 0  # tasks another path held, or that gained a prediction meanwhile
    images: int = 0
    failures: list[dict] = field(default_factory=list)
    message: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def new(cls, kind: str, project: int, model_version: str) -> JobRecord:
        return cls(uuid.uuid4().hex[:12], kind, int(project), model_version)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def rates(self, now: float | None = None) -> tuple[float | None, float | None]:
        """(images/s since the job started, seconds left at that rate)."""
        if not self.started_at:
            return None, None
        elapsed = (self.finished_at or now or time.time()) - self.started_at
        finished_tasks = self.done + self.failed + self.skipped
        if elapsed <= 0 or finished_tasks == 0:
            return None, None
        images_per_s = self.images / elapsed
        eta = None
        if self.total is not None and not self.finished:
            eta = max(0, self.total - finished_tasks) / (finished_tasks / elapsed)
        return round(images_per_s, 3), (round(eta, 1) if eta is not None else None)

    def public(self) -> dict:
        out = asdict(self)
        out["images_per_s"], out["eta_s"] = self.rates()
        return out

    @classmethod
    def from_public(cls, data: dict) -> JobRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def fail_task(self, task_id, reason: str, message: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append({"task": task_id, "reason": reason, "message": message[:300]})

    def mark_lost(self) -> None:
        self.state = "lost"
        self.finished_at = time.time()
        hint = RESUME_HINT.get(self.kind, RESUME_HINT["bulk"]).format(project=self.project)
        self.message = ("the job runner restarted while this job ran (its replica was lost); every prediction "
                        f"written so far is in Label Studio. To resume: {hint}")


class Claims:
    """Which of our paths is predicting which task: (project, task id) -> owner.

    A /predict claims its tasks for its run (a lease, so a caller that
    vanished cannot hold them forever); a job claims a page's tasks until
    they are written. A task held by another owner is not predicted again.
    A /predict's tasks answered with a prediction stay held by it for a while
    (LINGER_S), until Label Studio has stored the answer, against jobs only:
    another /predict may take them (Label Studio only sends a task again
    when it holds no prediction of it). Bounded by the tasks in flight and
    queued, plus lingering ones.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        # (project, task) -> (owner, until, free for a /predict)
        self._holders: dict[tuple[int, int], tuple[str, float, bool]] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._holders)

    def _sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + 5.0
            for key in [k for k, (_, until, _) in self._holders.items() if until <= now]:
                del self._holders[key]

    def holder(self, project: int, task_id: int) -> str | None:
        entry = self._holders.get((project, task_id))
        return entry[0] if entry and entry[1] > self._clock() else None

    def claim(self, project: int, task_ids, owner: str, lease_s: float | None = None,
              for_predict: bool = False) -> dict[int, str]:
        """Claim what is free (for a /predict, lingering claims count as free);
        {task id: owner} for tasks others hold."""
        now = self._clock()
        self._sweep(now)
        until = now + lease_s if lease_s is not None else float("inf")
        held = {}
        for task_id in task_ids:
            entry = self._holders.get((project, task_id))
            if entry and entry[0] != owner and entry[1] > now and not (for_predict and entry[2]):
                held[task_id] = entry[0]
            else:
                self._holders[(project, task_id)] = (owner, until, False)
        return held

    def transfer(self, project: int, task_ids, from_owner: str, to_owner: str) -> list[int]:
        """Hand `from_owner`'s claims on task_ids to `to_owner`; the ids moved."""
        moved = []
        for task_id in task_ids:
            entry = self._holders.get((project, task_id))
            if entry and entry[0] == from_owner:
                self._holders[(project, task_id)] = (to_owner, float("inf"), False)
                moved.append(task_id)
        return moved

    def release(self, project: int, task_ids, owner: str, linger_s: float = 0.0,
                against_predicts: bool = False) -> None:
        """End `owner`'s claims, at once or after `linger_s`: against jobs only
        (a /predict's answered tasks), or against /predict calls too (a job's
        written tasks: a click whose list Label Studio made before the write
        must not predict them again)."""
        until = self._clock() + linger_s
        for task_id in task_ids:
            entry = self._holders.get((project, task_id))
            if entry and entry[0] == owner:
                if linger_s > 0:
                    self._holders[(project, task_id)] = (owner, until, not against_predicts)
                else:
                    del self._holders[(project, task_id)]

    def release_owner(self, owner: str) -> None:
        """End what `owner` still holds open (lingering claims run their course)."""
        for key in [k for k, (o, until, _) in self._holders.items() if o == owner and until == float("inf")]:
            del self._holders[key]


# predict(task, config) -> a /predict item: {"result", "score", "model_version"} or an error item.
PredictTask = Callable[[dict, ParsedLabelConfig], Awaitable[dict]]


class JobRun:
    """Runs one job: tasks from `feed` through `predict`, predictions
    written back in chunks, progress in `record` (saved through `on_change`).

    At most `inflight_tasks` tasks are predicted at once (the detectors'
    batch capacity: an interactive request waits for about one batch).
    Nothing counts as done before Label Studio has stored it.
    """

    def __init__(self, record: JobRecord, api, predict: PredictTask, claims: Claims, *,
                 inflight_tasks: int, write_chunk: int = 100, on_change: Callable[[JobRecord], None] | None = None):
        self.record = record
        self.api = api
        self.predict = predict
        self.claims = claims
        self.inflight_tasks = max(1, inflight_tasks)
        self.write_chunk = max(1, write_chunk)
        self.on_change = on_change or (lambda record: None)
        self.cancel_requested = False
        self._pending_writes: list[dict] = []
        self._pending_sizes: list[int] = []  # prediction_bytes of each pending write
        self._write_lock = asyncio.Lock()
        self._fatal: str | None = None

    def set_state(self, state: str, message: str | None = None) -> None:
        record = self.record
        if record.state == state and message is None:
            return
        record.state = state
        if message is not None:
            record.message = message
        if state == "running" and record.started_at is None:
            record.started_at = time.time()
        if state in TERMINAL_STATES:
            record.finished_at = time.time()
        rate, _ = record.rates()
        logger.info("job %s (%s, project %s): %s; %d done, %d failed, %d written, %s of %s tasks%s%s",
                    record.id, record.kind, record.project, state, record.done, record.failed, record.written,
                    record.done + record.failed + record.skipped, record.total,
                    f", {rate} img/s" if rate else "", f": {record.message}" if message else "")
        self.on_change(record)

    async def run(self, feed: AsyncIterator[dict], config: ParsedLabelConfig) -> JobRecord:
        """Predict and write everything `feed` yields; ends in a terminal state.
        A cancel stops the feed and lets the tasks in flight finish and be
        written (they cost at most a batch or two); a failed write stops all."""
        running: set[asyncio.Task] = set()
        flusher = asyncio.ensure_future(self._flush_every(WRITE_EVERY_S))
        try:
            self.set_state("running")
            async for task in feed:
                while running and len(running) >= self.inflight_tasks and not self._fatal:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if self.cancel_requested or self._fatal:
                    break
                job = asyncio.ensure_future(self._one(task, config))
                running.add(job)
                job.add_done_callback(running.discard)
            if self._fatal:
                for job in running:
                    job.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            if not self._fatal:
                await self._write(force=True)
        except asyncio.CancelledError:
            for job in running:
                job.cancel()
            raise
        except LabelStudioAPIError as exc:
            self._fatal = self._fatal or f"Label Studio API: {exc}"
        finally:
            flusher.cancel()
            self.claims.release_owner(self.record.id)
        if self._fatal:
            self.set_state("failed", f"{self._fatal}; nothing is counted done that Label Studio did not store. "
                                     "Fix it and start the job again: it resumes where it stopped")
        elif self.cancel_requested:
            self.set_state("cancelled", "cancelled; predictions written so far stay in Label Studio")
        else:
            self.set_state("done")
        return self.record

    def cancel(self) -> None:
        if not self.record.finished and not self.cancel_requested:
            self.cancel_requested = True
            self.set_state("cancelling")

    async def _one(self, task: dict, config: ParsedLabelConfig) -> None:
        task_id = task["id"]
        item = await self.predict(task, config)
        self.record.images += max(1, len(config.image_keys))
        if "result" not in item:
            self.record.fail_task(task_id, item.get("error_reason", "error"), item.get("error", ""))
            self.claims.release(self.record.project, [task_id], self.record.id)
            return
        size = prediction_bytes(item["result"])
        self._pending_writes.append({"task": task_id, "result": item["result"], "score": item.get("score"),
                                     "model_version": self.record.model_version})
        self._pending_sizes.append(size)
        if len(self._pending_writes) >= self.write_chunk or sum(self._pending_sizes) >= MAX_WRITE_CHUNK_BYTES:
            await self._write()

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self._write(force=True)
            except LabelStudioAPIError as exc:
                self._fatal = self._fatal or f"Label Studio API: {exc}"

    async def _write(self, force: bool = False) -> None:
        async with self._write_lock:
            while (self._pending_writes and not self._fatal
                   and (force or len(self._pending_writes) >= self.write_chunk
                        or sum(self._pending_sizes) >= MAX_WRITE_CHUNK_BYTES)):
                n, size = 0, 0
                while n < min(MAX_WRITE_CHUNK, len(self._pending_writes)) and (n == 0 or size < MAX_WRITE_CHUNK_BYTES):
                    size += self._pending_sizes[n]
                    n += 1
                chunk, self._pending_writes = self._pending_writes[:n], self._pending_writes[n:]
                self._pending_sizes = self._pending_sizes[n:]
                await self._write_chunk(chunk)

    async def _write_chunk(self, chunk: list[dict]) -> None:
        """Write what Label Studio does not hold yet. Asked again before every
        try (an import that timed out on our side may have been stored), and
        after an import that created fewer than sent (with strict validation
        off, Label Studio drops invalid predictions silently)."""
        record = self.record
        ids = [item["task"] for item in chunk]
        written, not_stored = 0, []
        for attempt in range(WRITE_RETRIES + 1):
            try:
                there = await asyncio.to_thread(self.api.tasks_with_prediction, record.project, ids,
                                                record.model_version)
                fresh = [item for item in chunk if item["task"] not in there]
                if fresh:
                    created = await asyncio.to_thread(self.api.import_predictions, record.project, fresh)
                    written = len(fresh)
                    if created != len(fresh):
                        now_there = await asyncio.to_thread(self.api.tasks_with_prediction, record.project,
                                                            [item["task"] for item in fresh], record.model_version)
                        not_stored = [item["task"] for item in fresh if item["task"] not in now_there]
                        written -= len(not_stored)
                break
            except LabelStudioAPIError as exc:
                if not exc.retriable or attempt == WRITE_RETRIES:
                    self._fatal = (self._fatal
                                   or f"Label Studio refused the write-back of {len(chunk)} predictions ({exc})")
                    raise
                await asyncio.sleep(2 ** attempt)
        for task_id in not_stored:
            record.fail_task(task_id, "not_stored", "Label Studio did not store the prediction (its validation "
                                                    "dropped it); see Label Studio's log")
        record.written += written
        record.done += len(chunk) - len(not_stored)
        self.claims.release(record.project, not_stored, record.id)
        stored = [task_id for task_id in ids if task_id not in not_stored]
        self.claims.release(record.project, stored, record.id, LINGER_S, against_predicts=True)
        self.on_change(record)


async def pending_task_pages(api, record: JobRecord, claims: Claims, page_size: int,
                             task_ids: list[int] | None = None) -> AsyncIterator[dict]:
    """Tasks of the project without a prediction of this model version, page by
    page in id order (never the whole project in memory), claimed for the
    job; tasks another path holds are skipped (that path stores them)."""
    after = 0
    while True:
        page = await asyncio.to_thread(api.pending_tasks, record.project, record.model_version,
                                       after_id=after, page_size=page_size, task_ids=task_ids)
        if not page:
            return
        after = page[-1]["id"]
        held = claims.claim(record.project, [t["id"] for t in page], record.id)
        record.skipped += len(held)
        for task in page:
            if task["id"] not in held:
                yield task


class TaskQueue:
    """The feed of a background job: tasks handed over by /predict calls,
    more of them while the job runs. Once it ran dry it is closed, and a
    later hand-over starts a new job."""

    def __init__(self, max_tasks: int):
        self.max_tasks = max_tasks
        self._tasks: deque[dict] = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, tasks: list[dict]) -> bool:
        if self.closed or len(self._tasks) + len(tasks) > self.max_tasks:
            return False
        self._tasks.extend(tasks)
        return True

    async def __aiter__(self):
        while self._tasks:
            yield self._tasks.popleft()
        self.closed = True


def parse_project_config(xml, model: ModelOutputs | None = None) -> ParsedLabelConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the project has no label config")
    return cached_label_config(xml, model)
