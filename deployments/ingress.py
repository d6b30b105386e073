"""Ingress: the Label Studio ML backend protocol over HTTP (FastAPI)."""

import asyncio
import base64
import binascii
import builtins
import hmac
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from functools import lru_cache

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from mmdet_ls.credentials import access_for, basic_auth_setting, operator_access, setup_access
from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import LabelConfigError, ParsedLabelConfig, parse_label_config
from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import ImageJob, assemble_results, failure_item, plan_jobs, too_many_tasks

from . import metrics
from .image_loader import ImageRequest

logger = logging.getLogger("ray.serve")


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message that
    quotes a lone surrogate from the request (valid in JSON text, not in
    UTF-8) still renders, instead of failing the whole response."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# No /docs, /redoc or /openapi.json: Label Studio never reads them, and they
# would map the whole API for anyone who can reach the port.
app = FastAPI(
    title="MMDetection backend for Label Studio",
    default_response_class=SafeJSONResponse,
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)

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


# ------------------------------------------------ bounds on one /predict answer
# What one /predict call may cost, whatever it carries:
# - RESPONSE_BYTES_PER_BODY_BYTE, RESPONSE_SLACK_BYTES: tasks past the ones a
#   call predicts (max_tasks_per_request, max_images_per_request) get one
#   compact item each (~150 bytes, one short message shared by all); those
#   items must fit in 4 x the request body + 1 MiB, else the whole request is
#   refused with one 413 saying how many tasks a call may carry. The answer is
#   then at most 4 x body + 1 MiB + the predicted part, which is bounded by
#   max_tasks_per_request error items (messages cut to tasks.MAX_ERROR_CHARS)
#   and by regions (regions.MAX_REGIONS_PER_IMAGE, tasks.MAX_REGIONS_PER_RESPONSE).
# - MAX_BODY_JSON_VALUES: a body with more JSON values than this (commas,
#   "[" and "{" counted in its bytes, before parsing) is refused with a 413:
#   json.loads holds the GIL from start to end, so a thread does not keep a
#   parse of millions of tiny values (32 MiB of "[]," took 2 s) from stalling
#   the event loop that answers /health; 2 million values parse in ~0.2 s.
#   (A 32 MiB body of real Label Studio tasks, ~500 bytes each, has ~1.8 million.)
# - THREAD_PARSE_BYTES: bodies past this size are parsed, and answers past
#   it rendered, in a worker thread (asyncio.to_thread).
RESPONSE_BYTES_PER_BODY_BYTE = 4
RESPONSE_SLACK_BYTES = 1 << 20
MAX_BODY_JSON_VALUES = 2_000_000
THREAD_PARSE_BYTES = 64 << 10


def dumps_compact(value) -> bytes:
    """What SafeJSONResponse renders: ASCII only, no spaces."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_value_count(raw: bytes) -> int:
    """An upper bound on the values in a JSON text, from its bytes alone
    (commas, "[" and "{", also inside strings: an overestimate)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def parse_json_body(raw: bytes, max_values: int = MAX_BODY_JSON_VALUES) -> tuple[object, tuple[int, str] | None]:
    """(body, None) or (None, (status, message)); pure, safe to run in a thread."""
    if json_value_count(raw) > max_values:
        return None, (413, f"request body holds more than {max_values} JSON values")
    try:
        return json.loads(raw), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, (400, f"request body is not valid JSON: {exc}")
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer past Python's 4300-digit limit; RecursionError: nesting too deep.
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        return None, (400, f"request body is not valid JSON: {detail}")


async def read_json_body(request: Request, max_bytes: int, timeout_s: float, max_tasks: int):
    """(body, body size in bytes, None) or (None, 0, error response): the
    size cap, the time cap, the value cap and bad JSON, like _read_json, with
    big bodies parsed in a thread."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return None, 0, error_response(413, f"request body is larger than {max_bytes} bytes")
    chunks, size = [], 0

    async def receive() -> bool:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return False
            chunks.append(chunk)
        return True

    try:
        complete = await asyncio.wait_for(receive(), timeout=timeout_s)
    except asyncio.TimeoutError:  # a client trickling its body holds nothing for long
        return None, 0, error_response(408, f"request body not received within {timeout_s:g} s")
    if not complete:
        return None, 0, error_response(413, f"request body is larger than {max_bytes} bytes")
    if size == 0:
        return None, 0, error_response(400, "request body is empty; send a JSON object")
    raw = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    chunks.clear()
    if size > THREAD_PARSE_BYTES:
        body, error = await asyncio.to_thread(parse_json_body, raw)
    else:
        body, error = parse_json_body(raw)
    if error:
        status, message = error
        if status == 413:
            message += f"; one call may carry at most {max_tasks} tasks: send the rest in later calls"
        return None, 0, error_response(status, message)
    if not isinstance(body, dict):
        return None, 0, error_response(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body, size, None


def render_predict_answer(
    n_accepted: int, jobs, outcomes, failures, model_version: str, overflow_item: bytes, n_overflow: int
) -> tuple[bytes, list[dict]]:
    """The /predict answer's bytes (what SafeJSONResponse would render) and the
    items of the predicted part. Item by item, so a thread rendering a big
    answer lets the event loop run between items; the overflow items are one
    rendered item repeated."""
    results = assemble_results(n_accepted, jobs, outcomes, failures, model_version)
    parts = [b'{"results":[', b",".join(dumps_compact(item) for item in results)]
    if n_overflow:
        parts.append(overflow_item * n_overflow)  # each starts with ","; n_accepted >= 1 here
    parts += [b'],"model_version":', dumps_compact(model_version), b"}"]
    return b"".join(parts), results


_BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
)
# Exception names in a Serve deployment message: the last line of a traceback
# ("mmdet_ls.model_files.ModelFileError: ...") and Ray's "RayTaskError(Name)";
# not Serve's own wrapper around a failed constructor, "RuntimeError: Traceback ...".
_EXCEPTION_LINE = re.compile(
    r"(?m)^[ \t]*(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))\b(?!: Traceback \(most recent)"
)
_WRAPPED_EXCEPTION = re.compile(r"RayTaskError\(([A-Za-z_]\w*)\)")
_REPLICA_RESOURCES = re.compile(r"Resources required for each replica: (\{[^{}]{0,1000}\})")
_LOG_DETAILS = "details in the Detector replica's log"
_FAILED_TO_START = {
    "ModelFileError": "the model files could not be loaded; set checkpoint_file to a local .pth file or make its "
                      "URL reachable, and config_file to a config path or an mmdet config name",
    "ImportError": "a Python package the model needs is not installed on the Detector's node; install "
                   "requirements.txt there (torch, mmcv with its ops, mmdet)",
    "FileNotFoundError": "a file the model needs is missing on the Detector's node; check config_file, "
                         "checkpoint_file and the files the config refers to",
    "CUDA": "the GPU is missing, busy or out of memory; set device: cpu, or give the Detector a free GPU "
            "(ray_actor_options num_gpus) and a smaller max_batch_size",
    "RuntimeError": "the model could not be built from config_file and checkpoint_file (e.g. a checkpoint "
                    "saved for another config); check that they belong together",
}


def _replica_resources(message: str) -> str:
    """What one replica asks for, rebuilt from numbers only (never echoed)."""
    match = _REPLICA_RESOURCES.search(message)
    try:
        asked = json.loads(match.group(1)) if match else None
    except ValueError:
        asked = None
    if not isinstance(asked, dict):
        return "its ray_actor_options"
    clean = {k: v for k, v in list(asked.items())[:8]
             if isinstance(k, str) and re.fullmatch(r"[A-Za-z][\w.:-]{0,39}", k)
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return json.dumps(clean) if clean else "its ray_actor_options"


def describe_detector_message(message: str, status: str) -> tuple[str, str | None, str]:
    """One line for /health from Serve's message about the Detector, which may
    hold a whole traceback (with the checkpoint URL, credentials, local paths,
    pids and actor ids): a fixed text per kind of problem, never the message
    itself. Returns (detail, warning or None, what to log it as)."""
    names = [n for n in _WRAPPED_EXCEPTION.findall(message) + _EXCEPTION_LINE.findall(message)
             if n != "RayTaskError"]
    if names or "Traceback" in message or "failed to start" in message:
        raised = names[-1] if names else ""  # a traceback ends with what was raised
        if raised == "ModelFileError":
            key, shown = "ModelFileError", raised
        elif raised in ("ImportError", "ModuleNotFoundError"):
            key, shown = "ImportError", raised
        elif raised == "FileNotFoundError":
            key, shown = "FileNotFoundError", raised
        elif "CUDA" in message and raised in ("RuntimeError", "AssertionError", "OutOfMemoryError",
                                              "AcceleratorError"):
            key, shown = "CUDA", "CUDA error"
        elif raised == "RuntimeError":
            key, shown = "RuntimeError", raised
        else:
            key, shown = None, raised if raised in _BUILTIN_EXCEPTIONS else "an unexpected error"
        what = f"{_FAILED_TO_START[key]}; " if key else ""
        return f"the Detector failed to start ({shown}): {what}{_LOG_DETAILS}", None, "Detector failed to start"
    if "to be scheduled" in message or "Resources required" in message:
        return (
            "the Detector's replicas are waiting to be scheduled: each needs "
            f"{_replica_resources(message)} and no node has that free (e.g. no free GPU); add a node, "
            "or lower the Detector's ray_actor_options",
            "detector replicas are pending for resources (e.g. no node with a free GPU)",
            "Detector replicas pending for resources",
        )
    if "to initialize" in message:
        return ("the Detector is still starting: loading the model takes a while (a checkpoint download, "
                "a big model); /health says ready once it runs", None, "Detector slow to start")
    if "health check" in message:
        return (f"a Detector replica failed its health check and is being replaced; {_LOG_DETAILS}", None,
                "Detector health check failed")
    return (f"the Detector is not ready ({status}); details in the Serve controller's log", None,
            "Detector not ready")


def redact_credentials(text: str) -> str:
    """user:password@ in URLs -> ***@ (for logs)."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", text)


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
        predict_timeout_s: float = 90.0,
        max_tasks_per_request: int = 1000,
        max_inflight_images: int = 64,
        max_request_bytes: int = 32 * 1024 * 1024,
        basic_auth_user: str | None = None,
        health_requires_auth: bool = False,
        max_images_per_request: int | None = None,
        body_timeout_s: float = 30.0,
    ):
        self.loader = loader
        self.detector = detector
        self.postprocess = postprocess
        self.model_version = model_version
        self.model_class = model_class
        # Secrets are read here, from this replica's environment (never app args).
        self._operator_access = operator_access(label_studio_url)
        self.predict_timeout_s = predict_timeout_s
        self.max_tasks_per_request = max_tasks_per_request
        self.max_request_bytes = max_request_bytes
        # Images (not tasks) one request may start: a config with many <Image>
        # tags multiplies the work per task. Default: one per allowed task.
        self.max_images_per_request = max_images_per_request or max_tasks_per_request
        self.body_timeout_s = body_timeout_s
        self._inflight = asyncio.Semaphore(max_inflight_images)
        self._basic_auth = basic_auth_setting(basic_auth_user)
        self.health_requires_auth = health_requires_auth
        self.projects: OrderedDict[str, dict] = OrderedDict()  # project id -> setup access, label config
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
        # The scheme is case-insensitive (RFC 7235): "basic" and "BASIC" are Basic too.
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
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
        """The JSON body, or an error response (size, time and value caps, bad JSON)."""
        body, _, error = await read_json_body(request, self.max_request_bytes, self.body_timeout_s,
                                              self.max_tasks_per_request)
        return body, error

    def _label_studio_access(self, project: str | None):
        """The Label Studio (and the key that belongs to it) for a project."""
        stored = self.projects.get(project_key(project), {}) if project else {}
        return access_for(self._operator_access, stored.get("access"))

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
            # Serve's message may be a whole traceback: /health gets one fixed
            # line; the message itself goes to this replica's log, once per line.
            detail, warning, heading = describe_detector_message(detector.message, health["detector_status"])
            health["detail"] = detail
            if warning:
                health["warning"] = warning
            if getattr(self, "_detector_detail_logged", None) != detail:
                self._detector_detail_logged = detail
                logger.warning("%s: %s", heading, redact_credentials(detector.message))
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
            try:
                access = setup_access(body.get("hostname"), body.get("access_token"))
            except ValueError as exc:  # nothing is stored for bad values
                return error_response(400, str(exc))
            self.projects[project] = {"access": access, "label_config": schema}
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
        body, body_bytes, error = await read_json_body(
            request, self.max_request_bytes, self.body_timeout_s, self.max_tasks_per_request
        )
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
        # Tasks past `limit` get one compact item each, which must fit in the
        # answer's budget (RESPONSE_BYTES_PER_BODY_BYTE x body + RESPONSE_SLACK_BYTES).
        n_overflow = max(0, len(tasks) - limit)
        overflow_item = b"," + dumps_compact(failure_item(too_many_tasks(limit), self.model_version))
        if n_overflow * len(overflow_item) > RESPONSE_BYTES_PER_BODY_BYTE * body_bytes + RESPONSE_SLACK_BYTES:
            return error_response(
                413, f"too many tasks in one request ({len(tasks)}): one call may carry at most {limit} tasks "
                     "with this label config; send the rest in later calls",
            )
        accepted = tasks[:limit]
        jobs, failures = plan_jobs(accepted, config)
        access = self._label_studio_access(project)
        outcomes = await asyncio.gather(*(self._run_job(job, access, deadline) for job in jobs))
        args = (len(accepted), jobs, outcomes, failures, self.model_version, overflow_item, n_overflow)
        n_regions = sum(len(o.regions) for o in outcomes if isinstance(o, ImageResult))
        if len(accepted) + n_overflow > 100 or n_regions > 1000:  # big answers: assembled and rendered off the loop
            content, results = await asyncio.to_thread(render_predict_answer, *args)
        else:
            content, results = render_predict_answer(*args)
        self._record(results, outcomes, time.monotonic() - started, overflow=(n_overflow, limit))
        return Response(content, media_type="application/json")

    async def _run_job(self, job: ImageJob, access, deadline: float) -> ImageResult | TaskFailure:
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._inflight.acquire(), timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            return classify_exception(asyncio.TimeoutError())
        try:
            for attempt in range(2):
                responses = []
                try:
                    loaded = self.loader.load.remote(ImageRequest(job.task_id, job.value, access))
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

    def _record(
        self, results: list[dict], outcomes: list, request_s: float, overflow: tuple[int, int] = (0, 0)
    ) -> None:
        """Metrics and one log line; `overflow`: (tasks past the limit, the limit)."""
        for item in results:
            if "error" in item:
                metrics.tasks_total().inc(tags={"outcome": "failed"})
                metrics.task_failures_total().inc(tags={"reason": item["error_reason"]})
            else:
                metrics.tasks_total().inc(tags={"outcome": "predicted"})
        n_overflow, limit = overflow
        if n_overflow:
            metrics.tasks_total().inc(n_overflow, tags={"outcome": "failed"})
            metrics.task_failures_total().inc(n_overflow, tags={"reason": "too_many_tasks"})
        stages = metrics.stage_seconds()
        stages.observe(request_s, tags={"stage": "request"})
        for outcome in outcomes:
            if isinstance(outcome, ImageResult):
                for name, seconds in outcome.timings.items():
                    stages.observe(seconds, tags={"stage": name.removesuffix("_s")})
        # One line per request, not per task: a 10,000-task request of bad
        # tasks must not write 10,000 lines (the loader logs each image it could not load).
        failed = Counter(item["error_reason"] for item in results if "error" in item)
        examples = {}
        if n_overflow:
            failed["too_many_tasks"] += n_overflow
            examples["too_many_tasks"] = too_many_tasks(limit).message
        if failed:
            for item in results:
                if "error" in item:
                    examples.setdefault(item["error_reason"], item["error"][:200])
            logger.warning(
                "%d of %d tasks answered with an error: %s", sum(failed.values()), len(results) + n_overflow,
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

