"""Ingress: the Label Studio ML backend protocol over HTTP (FastAPI)."""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from collections import Counter, OrderedDict
from functools import lru_cache

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import LabelConfigError, ParsedLabelConfig, parse_label_config
from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import ImageJob, assemble_results, plan_jobs

from . import metrics
from .image_loader import ImageRequest

logger = logging.getLogger("ray.serve")


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message that
    quotes a lone surrogate from the request (valid in JSON text, not in
    UTF-8) still renders, instead of failing the whole response."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


app = FastAPI(title="MMDetection backend for Label Studio", default_response_class=SafeJSONResponse)

HEALTH_REFRESH_S = 2.0
MAX_PROJECTS = 256  # /setup entries kept (least recently used dropped); each holds a label config
# Ingress queue: requests past max_ongoing_requests wait at the proxy, up to
# this many; past that the proxy answers 503 with Retry-After.
INGRESS_MAX_QUEUED_REQUESTS = 256
RETRY_AFTER_S = 10


@lru_cache(maxsize=128)
def _cached_label_config(xml: str) -> ParsedLabelConfig:
    return parse_label_config(xml)


def cached_label_config(xml: str) -> ParsedLabelConfig:
    """Parsed config; LabelConfigError for anything the parser chokes on."""
    try:
        return _cached_label_config(xml)
    except LabelConfigError:
        raise
    except RecursionError:
        raise LabelConfigError("label config is nested too deeply") from None
    except (UnicodeError, ValueError) as exc:  # e.g. a lone surrogate (\ud800) from the JSON body
        raise LabelConfigError(f"label config is not valid text: {type(exc).__name__}") from None


def error_response(status: int, message: str, **extra) -> JSONResponse:
    return SafeJSONResponse(status_code=status, content={"status": "error", "error": message, **extra})


def classify_exception(exc: BaseException) -> TaskFailure:
    """A per-task failure for an infrastructure error (replica died, overload).

    What Ray 2.60 raises when awaiting a DeploymentResponse (measured):
    the replica that runs the call dies -> ActorDiedError (ActorUnavailableError
    while it is unreachable); a replica that produced an argument of the call
    (the loader, for the detector) dies -> RayServeException "...an upstream
    actor died..."; our own code raises -> RayTaskError(<the exception>);
    max_queued_requests exceeded -> BackPressureError. Only "replica_failed"
    is retried (once, by _run_job).
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


def short_id(task_id) -> str:
    """A task id for log lines: ids come from the request, so keep them short."""
    text = repr(task_id)
    return text if len(text) <= 40 else text[:40] + "..."


async def _await(response):
    return await response


def project_key(project) -> str:
    """Label Studio sends "<id>.<created_at epoch>"; projects are kept by id."""
    return str(project).split(".")[0][:100] if project is not None else ""


def collect_prometheus_text(prefix: str = metrics.PREFIX, timeout_s: float = 2.0) -> str:
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


# serve.ingress pickles the class when it decorates it: every module-level
# helper the methods use must be defined above this line.
# Requests wait cheaply here (bounded by max_inflight_images); a low limit
# would queue /health behind /predict calls past Label Studio's 1 s.
@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
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
        model_version: str,
        model_class: str = "MMDetection",
        label_studio_url: str | None = None,
        label_studio_api_key: str | None = None,
        predict_timeout_s: float = 90.0,
        max_tasks_per_request: int = 1000,
        max_inflight_images: int = 64,
        max_request_bytes: int = 32 * 1024 * 1024,
        basic_auth_user: str | None = None,
        basic_auth_pass: str | None = None,
        health_requires_auth: bool = False,
        max_images_per_request: int | None = None,
        body_timeout_s: float = 30.0,
    ):
        self.loader = loader
        self.detector = detector
        self.postprocess = postprocess
        self.model_version = model_version
        self.model_class = model_class
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self._api_key = label_studio_api_key
        self.predict_timeout_s = predict_timeout_s
        self.max_tasks_per_request = max_tasks_per_request
        self.max_request_bytes = max_request_bytes
        # Images (not tasks) one request may start: a config with many <Image>
        # tags multiplies the work per task. Default: one per allowed task.
        self.max_images_per_request = max_images_per_request or max_tasks_per_request
        self.body_timeout_s = body_timeout_s
        self._inflight = asyncio.Semaphore(max_inflight_images)
        self._basic_auth = (basic_auth_user, basic_auth_pass) if basic_auth_user else None
        self.health_requires_auth = health_requires_auth
        self.projects: OrderedDict[str, dict] = OrderedDict()  # project id -> hostname, token, label config
        self._health: dict = {"ready": False, "detail": "checking the detector"}
        self._health_checked = 0.0
        self._health_task: asyncio.Task | None = None
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:
            self.app_name = None

    # ------------------------------------------------------------ helpers
    def _authorized(self, request: Request) -> bool:
        if not self._basic_auth:
            return True
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the header
            return False
        user, _, password = decoded.partition(b":")
        # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500).
        expected_user = self._basic_auth[0].encode("utf-8")
        expected_pass = (self._basic_auth[1] or "").encode("utf-8")
        user_ok = hmac.compare_digest(user, expected_user)
        pass_ok = hmac.compare_digest(password, expected_pass)
        return user_ok and pass_ok

    def _unauthorized(self) -> JSONResponse:
        resp = error_response(401, "authentication required")
        resp.headers["WWW-Authenticate"] = 'Basic realm="mmdet-backend"'
        return resp

    async def _read_json(self, request: Request):
        """The JSON body, or an error response (size cap, time cap, bad JSON)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            return None, error_response(413, f"request body is larger than {self.max_request_bytes} bytes")
        chunks, size = [], 0

        async def receive() -> bool:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_request_bytes:
                    return False
                chunks.append(chunk)
            return True

        try:
            complete = await asyncio.wait_for(receive(), timeout=self.body_timeout_s)
        except asyncio.TimeoutError:  # a client trickling its body holds nothing for long
            return None, error_response(408, f"request body not received within {self.body_timeout_s:g} s")
        if not complete:
            return None, error_response(413, f"request body is larger than {self.max_request_bytes} bytes")
        if size == 0:
            return None, error_response(400, "request body is empty; send a JSON object")
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, error_response(400, f"request body is not valid JSON: {exc}")
        except (ValueError, RecursionError) as exc:
            # ValueError: an integer past Python's 4300-digit limit; RecursionError: nesting too deep.
            detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            return None, error_response(400, f"request body is not valid JSON: {detail}")
        if not isinstance(body, dict):
            return None, error_response(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body, None

    def _label_studio_access(self, project: str | None) -> tuple[str | None, str | None]:
        """Operator settings win; /setup's hostname and token are the fallback."""
        stored = self.projects.get(project_key(project), {}) if project else {}
        return (
            self.label_studio_url or stored.get("hostname"),
            self._api_key or stored.get("access_token"),
        )

    # ------------------------------------------------------------- health
    async def _refresh_health(self) -> None:
        try:
            self._health = await asyncio.to_thread(self._detector_status)
        except Exception as exc:
            self._health = {"ready": False, "detail": f"cannot read serve status: {type(exc).__name__}"}
        self._health_checked = time.monotonic()

    def _detector_status(self) -> dict:
        status = serve.status()
        app_status = status.applications.get(self.app_name) if self.app_name else None
        if app_status is None:
            return {"ready": False, "detail": "application status unknown"}
        detector = app_status.deployments.get("Detector")
        if detector is None:
            return {"ready": False, "detail": "no Detector deployment"}
        states = {str(getattr(k, "value", k)): v for k, v in detector.replica_states.items()}
        running = states.get("RUNNING", 0)
        health = {"ready": running > 0, "detector_status": str(getattr(detector.status, "value", detector.status)),
                  "detector_replicas": states}
        if detector.message:
            health["detail"] = detector.message
            if "scheduled" in detector.message or "resources" in detector.message:
                health["warning"] = "detector replicas are pending for resources (e.g. no node with a free GPU)"
                logger.warning("Detector replicas pending for resources: %s", detector.message)
        elif not running:
            # Ray names unschedulable replicas only after 30 s; until then either may be true.
            health["detail"] = "detector replicas are starting: loading the model, or waiting for resources"
        return health

    def _ensure_health_task(self) -> None:
        if time.monotonic() - self._health_checked > HEALTH_REFRESH_S and (
            self._health_task is None or self._health_task.done()
        ):
            self._health_task = asyncio.ensure_future(self._refresh_health())

    async def _health_body(self) -> dict:
        self._ensure_health_task()
        if self._health_checked == 0.0 and self._health_task is not None:
            # First call: wait briefly, never past Label Studio's 1 s limit.
            await asyncio.wait([self._health_task], timeout=0.5)
        return {
            "status": "UP",
            "model_class": self.model_class,
            "model_version": self.model_version,
            **self._health,
        }

    @app.get("/")
    @app.get("/health")
    async def health(self, request: Request):
        if self.health_requires_auth and not self._authorized(request):
            return self._unauthorized()
        return await self._health_body()

    # -------------------------------------------------------------- setup
    @app.post("/setup")
    async def setup(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        body, error = await self._read_json(request)
        if error:
            return error
        schema = body.get("schema")
        try:
            cached_label_config(schema if isinstance(schema, str) else "")
        except LabelConfigError as exc:
            return error_response(400, f"label config not usable: {exc}")
        project = project_key(body.get("project"))
        if project:
            hostname, token = body.get("hostname"), body.get("access_token")
            self.projects[project] = {
                "hostname": hostname.rstrip("/") if isinstance(hostname, str) and hostname else None,
                "access_token": token if isinstance(token, str) and token else None,
                "label_config": schema,
            }
            self.projects.move_to_end(project)
            while len(self.projects) > MAX_PROJECTS:
                self.projects.popitem(last=False)
        return {"model_version": self.model_version}

    # ------------------------------------------------------------ predict
    @app.post("/predict")
    async def predict(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        started = time.monotonic()
        deadline = started + self.predict_timeout_s
        body, error = await self._read_json(request)
        if error:
            return error
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return error_response(400, '"tasks" must be a list of Label Studio tasks')
        project = body.get("project")
        xml = body.get("label_config")
        if not isinstance(xml, str) or not xml.strip():
            xml = self.projects.get(project_key(project), {}).get("label_config") if project else None
        if not isinstance(xml, str):
            return error_response(400, 'no label config: send "label_config" or call /setup for this project first')
        try:
            config = cached_label_config(xml)
        except LabelConfigError as exc:
            return error_response(400, f"label config not usable: {exc}")

        images_per_task = max(1, len(config.image_keys))
        limit = max(1, min(self.max_tasks_per_request, self.max_images_per_request // images_per_task))
        accepted = tasks[:limit]
        jobs, failures = plan_jobs(accepted, config)
        ls_url, api_key = self._label_studio_access(project)
        outcomes = await asyncio.gather(*(self._run_job(job, ls_url, api_key, deadline) for job in jobs))
        results = assemble_results(len(accepted), jobs, outcomes, failures, self.model_version)
        overflow = TaskFailure(
            "too_many_tasks",
            f"more than {limit} tasks in one request; this task was not predicted, "
            "retrieve predictions again for the rest",
            retriable=True,
        )
        results.extend(
            assemble_results(len(tasks) - len(accepted), [], [], {i: overflow for i in range(len(tasks) - len(accepted))},
                             self.model_version)
        )
        self._record(results, outcomes, time.monotonic() - started)
        return {"results": results, "model_version": self.model_version}

    async def _run_job(self, job: ImageJob, ls_url, api_key, deadline: float) -> ImageResult | TaskFailure:
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._inflight.acquire(), timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            return classify_exception(asyncio.TimeoutError())
        try:
            for attempt in range(2):
                responses = []
                try:
                    loaded = self.loader.load.remote(ImageRequest(job.task_id, job.value, ls_url, api_key))
                    detected = self.detector.detect.remote(loaded)
                    regions = self.postprocess.to_regions.remote(detected, job.targets)
                    responses = [loaded, detected, regions]
                    return await asyncio.wait_for(_await(regions), timeout=max(0.0, deadline - time.monotonic()))
                except Exception as exc:
                    for r in responses:
                        # cancel() re-raises the call's own error when its routing
                        # already failed (e.g. an upstream replica died): that must
                        # not escape and turn the whole /predict into a 500.
                        try:
                            r.cancel()
                        except Exception:
                            pass
                    failure = classify_exception(exc)
                    if failure.reason in ("replica_failed", "internal_error"):
                        logger.warning("task %s: %s", short_id(job.task_id), type(exc).__name__, exc_info=exc)
                    # A replica that died mid-call: try once more on a healthy one.
                    if failure.reason == "replica_failed" and attempt == 0 and deadline - time.monotonic() > 5:
                        logger.warning("task %s: %s, retrying", short_id(job.task_id), type(exc).__name__)
                        continue
                    return failure
        finally:
            self._inflight.release()

    def _record(self, results: list[dict], outcomes: list, request_s: float) -> None:
        for item in results:
            if "error" in item:
                metrics.tasks_total().inc(tags={"outcome": "failed"})
                metrics.task_failures_total().inc(tags={"reason": item["error_reason"]})
            else:
                metrics.tasks_total().inc(tags={"outcome": "predicted"})
        stages = metrics.stage_seconds()
        stages.observe(request_s, tags={"stage": "request"})
        for outcome in outcomes:
            if isinstance(outcome, ImageResult):
                for name, seconds in outcome.timings.items():
                    stages.observe(seconds, tags={"stage": name.removesuffix("_s")})
        # One line per request, not per task: a 10,000-task request of bad
        # tasks must not write 10,000 lines (the loader logs each image it could not load).
        failed = Counter(item["error_reason"] for item in results if "error" in item)
        if failed:
            examples = {}
            for item in results:
                if "error" in item:
                    examples.setdefault(item["error_reason"], item["error"][:200])
            logger.warning(
                "%d of %d tasks answered with an error: %s", sum(failed.values()), len(results),
                "; ".join(f"{reason} x{n} (e.g. {examples[reason]})" for reason, n in failed.most_common(10)),
            )

    # ------------------------------------------------------------ webhook
    @app.post("/webhook")
    async def webhook(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        body, error = await self._read_json(request)
        if error:
            return error
        action = body.get("action")
        return {
            "status": "ok",
            "action": action if isinstance(action, str) else None,
            "handled": False,
            "detail": "event acknowledged; this backend does not train, so annotation events change nothing",
        }

    # ------------------------------------------------------------ metrics
    @app.get("/metrics")
    async def prometheus_metrics(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        text = await asyncio.to_thread(collect_prometheus_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

