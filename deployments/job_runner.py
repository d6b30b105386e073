"""JobRunner: the one named place where pre-annotation jobs run.

Bulk jobs (POST /jobs), background completion of a /predict that ran out
of time, and new-task jobs (TASKS_CREATED webhook, periodic sweep) all run
here, through the same ImageLoader -> Detector -> Postprocess deployments
as /predict, and write predictions back with the operator's Label Studio
key (mmdet_ls/jobs.py has the logic). Job records live in Ray's GCS key-value
store, so a restarted runner finds the jobs it lost and says how they resume;
what is done is what Label Studio has stored.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from mmdet_ls.credentials import operator_access
from mmdet_ls.jobs import LINGER_S, Claims, JobRecord, JobRun, TaskQueue, parse_project_config, pending_task_pages
from mmdet_ls.label_config import LabelConfigError, ModelOutputs
from mmdet_ls.labelstudio_api import LabelStudioAPI, LabelStudioAPIError

from . import metrics
from .graph import GraphClient

logger = logging.getLogger("ray.serve")

PAGE_SIZE = 100  # tasks listed per Label Studio call
WRITE_CHUNK = 100  # predictions per import call
MAX_JOBS_KEPT = 100  # finished job records kept (oldest go first)
MAX_BACKGROUND_TASKS = 100_000  # tasks waiting in one project's background queue
MAX_ACTIVE_JOBS = 32  # jobs not finished at once (each holds a feed, claims and tasks in flight)
MAX_SWEEP_PROJECTS = 10_000
TASK_DEADLINE_S = 600.0  # one task's load + inference in a job (fetch limits bound the load)
# Per Detector replica: one batch computing, one waiting, so the Detector
# never idles between batches and its autoscaling sees the load. The waiting
# one waits at the Detector's bulk gate, not in its batch queue, so an
# annotator's image goes ahead of it (Detector.detect_group(bulk=True)).
BATCHES_IN_FLIGHT = 2
CAPACITY_REFRESH_S = 10.0
# A /predict's claim lapses after this even if its release never comes
# (Label Studio's 100 s, plus the time it takes to store the answer).
PREDICT_CLAIM_LEASE_S = 100.0 + LINGER_S
NO_KEY = ("jobs write predictions through Label Studio's API: set LABEL_STUDIO_API_KEY (a key with write "
          "access to the project) and LABEL_STUDIO_URL in the environment of the Ray cluster")


class JobStore:
    """Job records in Ray's GCS key-value store (survives replicas, not the cluster)."""

    def __init__(self, namespace: str):
        from ray.experimental import internal_kv

        self._kv = internal_kv
        self._namespace = namespace

    def save(self, record: JobRecord) -> None:
        self._kv._internal_kv_put(record.id, json.dumps(record.public()).encode(), overwrite=True,
                                  namespace=self._namespace)

    def delete(self, job_id: str) -> None:
        self._kv._internal_kv_del(job_id, namespace=self._namespace)

    def load_all(self) -> list[JobRecord]:
        records = []
        for key in self._kv._internal_kv_list("", namespace=self._namespace):
            raw = self._kv._internal_kv_get(key, namespace=self._namespace)
            if raw:
                try:
                    records.append(JobRecord.from_public(json.loads(raw)))
                except (ValueError, TypeError):
                    continue
        return records


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class JobRunner:
    def __init__(self, loader: DeploymentHandle, detector: DeploymentHandle, postprocess: DeploymentHandle,
                 model_version: str, label_studio_url: str | None = None, annotate_new_tasks: bool = False,
                 annotate_sweep_interval_s: float = 600.0, bulk_inflight_images: int | None = None,
                 model_outputs: ModelOutputs | None = None):
        self.model_version = model_version
        self.model_outputs = model_outputs
        self.detector = detector
        access = operator_access(label_studio_url)
        self.access = access if access is not None and access.api_key else None
        self.api = LabelStudioAPI(self.access) if self.access else None
        # Its in-flight bound follows the Detectors' capacity (below), so a
        # job's images travel in groups, a few per call.
        self.graph = GraphClient(loader, detector, postprocess, max_inflight_images=bulk_inflight_images or 8,
                                 bulk=True)
        self.claims = Claims()
        self.annotate_new_tasks = annotate_new_tasks
        self.sweep_interval_s = annotate_sweep_interval_s
        self.fixed_inflight = bulk_inflight_images
        self.inflight_images = bulk_inflight_images or 8
        self.records: dict[str, JobRecord] = {}
        self.runs: dict[str, JobRun] = {}
        self.background_queues: dict[int, tuple[str, TaskQueue]] = {}
        self.sweep_projects: set[int] = set()  # projects whose TASKS_CREATED webhooks reach us
        self._tasks: set[asyncio.Task] = set()
        try:
            app = serve.get_replica_context().app_name
        except Exception:
            app = "default"
        self.store = JobStore("mmdet_ls_jobs." + app.replace(":", "_"))  # ":" splits GCS namespaces
        for record in self.store.load_all():
            if not record.finished:
                record.mark_lost()
                self.store.save(record)
                logger.warning("job %s (%s, project %s): lost; %s", record.id, record.kind, record.project,
                               record.message)
            self.records[record.id] = record
        self._trim()
        self._spawn(self._refresh_capacity_forever())
        if self.annotate_new_tasks and self.api:
            self._spawn(self._sweep_forever())
        metrics.record_jobs(self.records.values())

    # ------------------------------------------------------------ plumbing
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _trim(self) -> None:
        finished = sorted((r for r in self.records.values() if r.finished), key=lambda r: r.created_at)
        for record in finished[: max(0, len(self.records) - MAX_JOBS_KEPT)]:
            del self.records[record.id]
            self.store.delete(record.id)

    def _saved(self, record: JobRecord) -> None:
        self.store.save(record)
        metrics.record_jobs(self.records.values())

    async def _refresh_capacity_forever(self) -> None:
        while True:
            if not self.fixed_inflight:
                try:
                    info = await self.detector.info.remote()
                    replicas = self._detector_replicas()
                    self.inflight_images = max(1, info["max_batch_size"] * replicas * BATCHES_IN_FLIGHT)
                except Exception:  # the detector is starting or restarting: keep the last value
                    pass
                self.graph.dispatcher.set_max_inflight(self.inflight_images)
                for run in self.runs.values():
                    run.inflight_tasks = self.inflight_images
            await asyncio.sleep(CAPACITY_REFRESH_S)

    @staticmethod
    def _detector_replicas() -> int:
        try:
            context = serve.get_replica_context()
            status = serve.status().applications[context.app_name].deployments["Detector"]
            return max(1, int(status.replica_states.get("RUNNING", 1)))
        except Exception:
            return 1

    async def _predict(self, task: dict, config) -> dict:
        return await self.graph.predict_task(task, config, self.access, time.monotonic() + TASK_DEADLINE_S,
                                             self.model_version)

    def _start(self, record: JobRecord, feed_factory, config_source) -> JobRecord:
        """Register the job and run it in the background."""
        run = JobRun(record, self.api, self._predict, self.claims, inflight_tasks=self.inflight_images,
                     write_chunk=WRITE_CHUNK, on_change=self._saved)
        self.records[record.id] = record
        self.runs[record.id] = run
        self._trim()
        self._saved(record)

        async def go():
            try:
                run.set_state("listing")
                config = await config_source()
                feed = await feed_factory(run)
                await run.run(feed, config)
            except (LabelStudioAPIError, LabelConfigError) as exc:
                run.set_state("failed", str(exc))
            except Exception as exc:  # never leave a job looking alive
                logger.exception("job %s crashed", record.id)
                run.set_state("failed", f"internal error: {type(exc).__name__}")
            finally:
                self.runs.pop(record.id, None)
                self.claims.release_owner(record.id)
                if self.background_queues.get(record.project, (None,))[0] == record.id:
                    del self.background_queues[record.project]

        self._spawn(go())
        return record

    async def _project_config(self, project: int):
        info = await asyncio.to_thread(self.api.project, project)
        return parse_project_config(info.get("label_config"), self.model_outputs)

    # ------------------------------------------------------------ API (called by the ingress)
    def enabled(self) -> str | None:
        """None when jobs can run, else why not."""
        return None if self.api else NO_KEY

    async def start_bulk(self, project: int, task_ids: list[int] | None = None, kind: str = "bulk") -> dict:
        """{"job": ...} (202), or {"error", "status", "job"?}."""
        if not self.api:
            return {"status": 503, "error": NO_KEY}
        if len(self.runs) >= MAX_ACTIVE_JOBS:
            return {"status": 503, "error": f"{MAX_ACTIVE_JOBS} jobs are running; start this one when one ends"}
        if task_ids is None:  # one whole-project job per project at a time
            running = next((r for r in self.records.values()
                            if r.project == project and r.selection == "all" and not r.finished), None)
            if running:
                return {"status": 409, "error": f"job {running.id} is already predicting project {project}",
                        "job": running.public()}
        record = JobRecord.new(kind, project, self.model_version)
        record.selection = "all" if task_ids is None else f"{len(task_ids)} tasks"

        async def feed_factory(run: JobRun):
            run.record.total = await asyncio.to_thread(self.api.count_pending, project, self.model_version, task_ids)
            self._saved(run.record)
            return pending_task_pages(self.api, run.record, self.claims, PAGE_SIZE, task_ids)

        self._start(record, feed_factory, lambda: self._project_config(project))
        return {"status": 202, "job": record.public()}

    async def claim(self, project: int, task_ids: list[int], owner: str) -> dict[int, str]:
        """Claim tasks for a /predict; {task id: "job <id>" or "call"} for those held elsewhere."""
        held = self.claims.claim(project, task_ids, owner, lease_s=PREDICT_CLAIM_LEASE_S, for_predict=True)
        return {t: (f"job {o}" if o in self.records else "call") for t, o in held.items()}

    async def release(self, project: int, predicted: list[int], failed: list[int], owner: str,
                      linger_s: float) -> None:
        """A /predict answered: its predicted tasks stay held against jobs until
        Label Studio stored them; failed ones are free at once."""
        self.claims.release(project, predicted, owner, linger_s)
        self.claims.release(project, failed, owner)

    async def background(self, project: int, tasks: list[dict], label_config: str, owner: str) -> dict:
        """Take over a /predict's unfinished tasks: {"job": id} or {"error": why}."""
        if not self.api:
            return {"error": NO_KEY}
        ids = [t["id"] for t in tasks]
        entry = self.background_queues.get(project)
        if entry and entry[0] in self.runs and entry[1].add(tasks):
            job_id = entry[0]
            self.claims.transfer(project, ids, owner, job_id)
            record = self.records[job_id]
            record.total = (record.total or 0) + len(tasks)
            self._saved(record)
            return {"job": job_id}
        if len(self.runs) >= MAX_ACTIVE_JOBS:
            return {"error": f"{MAX_ACTIVE_JOBS} jobs are running"}
        queue = TaskQueue(MAX_BACKGROUND_TASKS)
        if not queue.add(tasks):
            return {"error": f"too many tasks waiting in the background (at most {MAX_BACKGROUND_TASKS})"}
        record = JobRecord.new("background", project, self.model_version)
        record.selection = "tasks Retrieve predictions did not finish in time"
        record.total = len(tasks)
        self.claims.transfer(project, ids, owner, record.id)
        self.background_queues[project] = (record.id, queue)

        async def config_source():
            return parse_project_config(label_config, self.model_outputs)

        async def feed_factory(run):
            return queue

        self._start(record, feed_factory, config_source)
        return {"job": record.id}

    async def tasks_created(self, project: int, task_ids: list[int]) -> dict:
        """TASKS_CREATED webhook: a job for the new tasks (when annotate_new_tasks is on)."""
        if not self.annotate_new_tasks:
            return {"handled": False, "detail": "annotate_new_tasks is off"}
        if len(self.sweep_projects) < MAX_SWEEP_PROJECTS:
            self.sweep_projects.add(project)
        answer = await self.start_bulk(project, task_ids or None, kind="new_tasks")
        return {"handled": answer.get("status") in (202, 409), **answer}

    async def _sweep_forever(self) -> None:
        """Webhooks come once, without retry: a sweep catches tasks whose
        webhook was missed: every project that sent us TASKS_CREATED, when no
        whole-project job runs for it (a 409 from start_bulk: skipped)."""
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            for project in sorted(self.sweep_projects):
                try:
                    await self.start_bulk(project, None, kind="new_tasks")
                except Exception as exc:
                    logger.warning("sweep of project %s: %s", project, type(exc).__name__)

    async def get(self, job_id: str) -> dict | None:
        record = self.records.get(job_id)
        return record.public() if record else None

    async def list(self) -> list[dict]:
        return [r.public() for r in sorted(self.records.values(), key=lambda r: r.created_at, reverse=True)]

    async def cancel(self, job_id: str) -> dict | None:
        record = self.records.get(job_id)
        if record is None:
            return None
        run = self.runs.get(job_id)
        if run is not None:
            run.cancel()
        return record.public()

