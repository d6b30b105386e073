"""Ingress: the Label Studio ML backend protocol over HTTP (FastAPI).

/predict fans each task's images out through ImageLoader -> Detector ->
Postprocess and answers one item per task, in order. The plumbing lives
next door: http_io (bodies, caps, rendering), auth (basic auth), health
(/health), ray_errors (failures and the retry), metrics.
"""

import asyncio
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from mmdet_ls.credentials import (
    access_for,
    basic_auth_setting,
    jobs_token_setting,
    operator_access,
    setup_access,
    webhook_secret_setting,
)
from mmdet_ls.jobs import LINGER_S
from mmdet_ls.label_config import LabelConfigError, ModelOutputs
from mmdet_ls.projects import Projects, cached_label_config, project_key
from mmdet_ls.tasks import plan_jobs

from . import metrics
from .auth import (
    AuthRequired,
    BasicAuth,
    JobsAuth,
    JobsAuthMissing,
    WebhookAuth,
    answer_auth_required,
    answer_jobs_auth_missing,
)
from .background import HANDOVER_S, BackgroundCompletion
from .graph import GraphClient
from .health import DetectorHealth
from .http_io import SafeJSONResponse, error_response, plan_overflow, read_json_body, render_predict_answer_off_loop

logger = logging.getLogger("ray.serve")

# No /docs, /redoc or /openapi.json: Label Studio never reads them, and they
# would map the whole API for anyone who can reach the port.
app = FastAPI(
    title="MMDetection backend for Label Studio",
    default_response_class=SafeJSONResponse,
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    exception_handlers={AuthRequired: answer_auth_required, JobsAuthMissing: answer_jobs_auth_missing},
)
AUTH = [Depends(BasicAuth())]
JOBS_AUTH = [Depends(JobsAuth())]
WEBHOOK_AUTH = [Depends(WebhookAuth())]
MAX_JOB_TASK_IDS = 100_000  # task ids one POST /jobs may name
HEALTH_AUTH = [Depends(BasicAuth(for_health=True))]

# Ingress queue: requests past max_ongoing_requests wait at the proxy, up to
# this many; past that the proxy answers 503 with Retry-After.
INGRESS_MAX_QUEUED_REQUESTS = 256
RETRY_AFTER_S = 10
# Defaults, also of serve_app.AppArgs' args of the same names.
PREDICT_TIMEOUT_S = 90.0  # Label Studio gives up at 100 s
MAX_TASKS_PER_REQUEST = 1000
# Images in flight per ingress replica, by where the Detector runs, unless
# set: on the CPU 32 are seconds of work, and since a source has
# max_inflight_images / 8 calls in flight (deployments/dispatch.py), fewer
# means concurrent one-task requests travel more images per call; a GPU
# needs more in flight to stay fed while images load.
MAX_INFLIGHT_IMAGES = {"cpu": 32, "gpu": 64}


def created_tasks(body: dict) -> tuple[int | None, list[int]]:
    """(project id, new task ids) of a TASKS_CREATED webhook body."""
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else project
    if not isinstance(project_id, int) or isinstance(project_id, bool):
        return None, []
    tasks = body.get("tasks")
    ids = [t.get("id") for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    return project_id, [t for t in ids if isinstance(t, int) and not isinstance(t, bool)][:MAX_JOB_TASK_IDS]


# serve.ingress pickles the class when it decorates it: module-level helpers
# the methods use must be defined above it (imported ones are fine).
# Requests wait cheaply here (bounded by max_inflight_images); a low limit
# would queue /health behind /predict calls past Label Studio's 1 s.
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    max_queued_requests=INGRESS_MAX_QUEUED_REQUESTS,
    backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
)
@serve.ingress(app)
class LabelStudioIngress:
    def __init__(
        self,
        loader: DeploymentHandle,
        detector: DeploymentHandle,
        postprocess: DeploymentHandle,
        jobs: DeploymentHandle,
        model_version: str,
        model_class: str = "MMDetection",
        label_studio_url: str | None = None,
        predict_timeout_s: float = PREDICT_TIMEOUT_S,
        max_tasks_per_request: int = MAX_TASKS_PER_REQUEST,
        max_inflight_images: int = MAX_INFLIGHT_IMAGES["cpu"],
        max_request_bytes: int = 32 * 1024 * 1024,
        basic_auth_user: str | None = None,
        health_requires_auth: bool = False,
        max_images_per_request: int | None = None,
        body_timeout_s: float = 30.0,
        model_outputs: ModelOutputs | None = None,
    ):
        self.detector = detector
        self.model_outputs = model_outputs
        self.jobs = jobs
        self.model_version = model_version
        self.model_class = model_class
        # Secrets are read here, from this replica's environment (never app args).
        self._operator_access = operator_access(label_studio_url)
        self.basic_auth = basic_auth_setting(basic_auth_user)  # read by the BasicAuth and JobsAuth dependencies
        self.jobs_token = jobs_token_setting()  # read by the JobsAuth dependency
        self.webhook_secret = webhook_secret_setting()  # read by the WebhookAuth dependency
        self.health_requires_auth = health_requires_auth
        self.predict_timeout_s = predict_timeout_s
        self.max_tasks_per_request = max_tasks_per_request
        self.max_request_bytes = max_request_bytes
        # Images (not tasks) one request may start: a config with many <Image>
        # tags multiplies the work per task. Default: one per allowed task.
        self.max_images_per_request = max_images_per_request or max_tasks_per_request
        self.body_timeout_s = body_timeout_s
        self.graph = GraphClient(loader, detector, postprocess, max_inflight_images)
        # Unfinished tasks go on in the JobRunner when the operator's key can write them back.
        has_key = self._operator_access is not None and self._operator_access.api_key is not None
        self.background = BackgroundCompletion(jobs if has_key else None, model_version)
        self.projects = Projects()
        self.detector_health = DetectorHealth()

    async def _read_json(self, request: Request):
        """(body, body size, None) or (None, 0, error response)."""
        return await read_json_body(request, self.max_request_bytes, self.body_timeout_s, self.max_tasks_per_request)

    @app.get("/", dependencies=HEALTH_AUTH)
    @app.get("/health", dependencies=HEALTH_AUTH)
    async def health(self):
        detector = await self.detector_health.current()
        return {"status": "UP", "model_class": self.model_class, "model_version": self.model_version, **detector}

    @app.post("/setup", dependencies=AUTH)
    async def setup(self, request: Request):
        body, _, error = await self._read_json(request)
        if error:
            return error
        schema = body.get("schema")
        try:
            cached_label_config(schema if isinstance(schema, str) else "", self.model_outputs)
        except LabelConfigError as exc:
            return error_response(400, f"label config not usable: {exc}")
        project = body.get("project")
        if project_key(project):
            try:
                access = setup_access(body.get("hostname"), body.get("access_token"))
            except ValueError as exc:  # nothing is stored for bad values
                return error_response(400, str(exc))
            self.projects.remember(project, access, schema)
        return {"model_version": self.model_version}

    @app.post("/predict", dependencies=AUTH)
    async def predict(self, request: Request):
        started = time.monotonic()
        deadline = started + self.predict_timeout_s
        body, body_bytes, error = await self._read_json(request)
        if error:
            return error
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return error_response(400, '"tasks" must be a list of Label Studio tasks')
        project = body.get("project")
        xml = body.get("label_config")
        if not isinstance(xml, str) or not xml.strip():
            xml = self.projects.label_config(project)
        if not isinstance(xml, str):
            return error_response(400, 'no label config: send "label_config" or call /setup for this project first')
        try:
            config = cached_label_config(xml, self.model_outputs)
        except LabelConfigError as exc:
            return error_response(400, f"label config not usable: {exc}")

        images_per_task = max(1, len(config.image_keys))
        limit = max(1, min(self.max_tasks_per_request, self.max_images_per_request // images_per_task))
        overflow_item, n_overflow, refusal = plan_overflow(len(tasks), limit, body_bytes, self.model_version)
        if refusal:
            return refusal
        accepted = tasks[:limit]
        jobs, failures = plan_jobs(accepted, config)
        claim = await self.background.claim(project, accepted)
        jobs = [job for job in jobs if job.task_index not in claim.held]
        failures.update(claim.held)
        logger.debug("predict: %d tasks (%d images, %d beyond this call)", len(accepted), len(jobs), n_overflow)
        access = access_for(self._operator_access, self.projects.access(project))
        # With background completion the hand-over happens after the images'
        # deadline: keep its time inside predict_timeout_s.
        images_deadline = deadline - (HANDOVER_S if claim.project is not None else 0.0)
        outcomes = await self.graph.run_jobs(jobs, access, images_deadline)
        failures.update(await self.background.hand_over(claim, accepted, jobs, outcomes, xml))
        content, results = await render_predict_answer_off_loop(
            len(accepted), jobs, outcomes, failures, self.model_version, overflow_item, n_overflow
        )
        await self.background.release(claim, results, LINGER_S)
        metrics.record_predict(results, outcomes, time.monotonic() - started, overflow=(n_overflow, limit))
        return Response(content, media_type="application/json")

    @app.post("/webhook", dependencies=WEBHOOK_AUTH)
    async def webhook(self, request: Request):
        """Label Studio sends every project event here (1 s timeout, no retry).
        TASKS_CREATED starts a job for the new tasks when annotate_new_tasks
        is on; the job runs in the JobRunner, this answers at once."""
        body, _, error = await self._read_json(request)
        if error:
            return error
        action = body.get("action")
        if action == "TASKS_CREATED":
            project, task_ids = created_tasks(body)
            if project is not None:
                try:
                    answer = await asyncio.wait_for(self.jobs.tasks_created.remote(project, task_ids), 0.5)
                except Exception as exc:  # the periodic sweep catches these tasks later
                    answer = {"handled": False, "detail": f"job runner busy ({type(exc).__name__}); the sweep "
                                                          "will catch these tasks"}
                return {"status": "ok", "action": action, **{k: v for k, v in answer.items() if k != "status"}}
        return {
            "status": "ok",
            "action": action if isinstance(action, str) else None,
            "handled": False,
            "detail": "event acknowledged; this backend does not train, so annotation events change nothing",
        }

    # ------------------------------------------------------------ /jobs
    @app.post("/jobs", dependencies=JOBS_AUTH)
    async def start_job(self, request: Request):
        body, _, error = await self._read_json(request)
        if error:
            return error
        project, task_ids = body.get("project"), body.get("task_ids")
        if isinstance(project, str) and project.isdigit():
            project = int(project)
        if not isinstance(project, int) or isinstance(project, bool) or project < 1:
            return error_response(400, '"project" must be a Label Studio project id')
        if task_ids is not None and (not isinstance(task_ids, list) or len(task_ids) > MAX_JOB_TASK_IDS
                                     or not all(isinstance(t, int) and not isinstance(t, bool) for t in task_ids)):
            return error_response(400, f'"task_ids" must be a list of at most {MAX_JOB_TASK_IDS} task ids')
        answer = await self.jobs.start_bulk.remote(project, task_ids)
        status = answer.pop("status")
        return JSONResponse(answer, status_code=status)

    @app.get("/jobs", dependencies=JOBS_AUTH)
    async def list_jobs(self):
        return {"jobs": await self.jobs.list.remote()}

    @app.get("/jobs/{job_id}", dependencies=JOBS_AUTH)
    async def get_job(self, job_id: str):
        job = await self.jobs.get.remote(job_id[:64])
        if job is None:
            return error_response(404, f"no job {job_id[:64]!r} (finished jobs are kept until "
                                       "100 newer ones; a job runner restart keeps them)")
        return {"job": job}

    @app.delete("/jobs/{job_id}", dependencies=JOBS_AUTH)
    async def cancel_job(self, job_id: str):
        job = await self.jobs.cancel.remote(job_id[:64])
        if job is None:
            return error_response(404, f"no job {job_id[:64]!r}")
        return {"job": job}

    @app.get("/metrics", dependencies=AUTH)
    async def prometheus_metrics(self):
        text = await asyncio.to_thread(metrics.collect_prometheus_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
