"""Bounds the service keeps whatever it is sent, through the running service.

One Ray Serve app: the SHIPPED serve_config.yaml, deployed declaratively as
`serve deploy` does, with basic auth on and a checkpoint_file the Detector can
never load (a URL on 127.0.0.1's closed port 9, with fake credentials in it:
nothing leaves the machine). So the Detector fails to start, as it does for
anyone who runs the shipped config offline, and everything else runs:

- /health says in one line what is wrong and what to set, never the traceback,
  the URL, its credentials, paths, pids or actor/replica ids, within 1 s;
- /docs, /redoc and /openapi.json do not exist;
- the Basic scheme word is case-insensitive;
- the answer is bounded by what the request is worth: tasks past the per-call
  limit get one compact item each, and a request whose answer would pass
  4 x its body + 1 MiB (or whose body holds millions of JSON values) gets one
  413; /health answers in < 1 s while the largest answerable request runs.

None of these tasks reach the Detector: they fail planning (no "data") or lie
past the per-call limit, exactly the cases that cost the service nothing but
the answer.
"""
import base64
import contextlib
import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from payloads import ls_task, task
from serve_fixtures import free_port, serve_config_for_test, stop_serve, wait_until

from deployments.http_io import MAX_BODY_JSON_VALUES, RESPONSE_BYTES_PER_BODY_BYTE, RESPONSE_SLACK_BYTES
from mmdet_ls.tasks import MAX_ERROR_CHARS

pytestmark = pytest.mark.timeout(900)

APP = "mmdet-backend"
AUTH_USER, AUTH_PASS = "bounds-user", "bounds-pass-4e1f9a"
AUTH = (AUTH_USER, AUTH_PASS)
CHECKPOINT_URL = "http://user:pw@127.0.0.1:9/models/x.pth"
# Its own one-label config on purpose: the request bodies below are sized with it.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="Car" predicted_values="car"/></RectangleLabels></View>'
)
LIMIT = 1000  # max_tasks_per_request of the shipped config (the default)
HEALTH_LIMIT_S = 1.0  # Label Studio's timeout for /health
FORBIDDEN_IN_HEALTH = ("Traceback", "user:pw", "127.0.0.1:9", "/root", "/home", "/tmp", "pid", "actor", "Actor",
                       "replica_", "ServeReplica", "File \"")
MODEL_FILE_DETAIL = (
    "the Detector failed to start (ModelFileError): the model files could not be loaded; set checkpoint_file to a "
    "local .pth file or make its URL reachable, and config_file to a config path or an mmdet config name; details "
    "in the Detector replica's log"
)


def deployment(name: str):
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments.get(name) if app is not None else None


def timed_health(url: str) -> tuple[float, requests.Response]:
    started = time.monotonic()
    resp = requests.get(f"{url}/health", timeout=10)
    return time.monotonic() - started, resp


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    tmp = tmp_path_factory.mktemp("bounds")
    (tmp / "upload").mkdir()
    config = serve_config_for_test(free_port(), {
        "checkpoint_file": CHECKPOINT_URL,
        "image_dir": str(tmp / "upload"),
        "basic_auth_user": AUTH_USER,
    })
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with pytest.MonkeyPatch.context() as mp:
        # The replicas (started by this ray.init) inherit these.
        mp.setenv("BASIC_AUTH_PASS", AUTH_PASS)
        mp.setenv("MODEL_DIR", str(tmp / "checkpoints"))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options=config["http_options"])
            _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config))
            # Not start_serve_config: that waits for RUNNING. Here the Detector
            # must end DEPLOY_FAILED; every /health on the way is recorded.
            seen: list[tuple[float, int, str]] = []

            def detector_failed():
                try:
                    elapsed, resp = timed_health(url)
                    seen.append((elapsed, resp.status_code, resp.text))
                except requests.RequestException:
                    pass  # the proxy or the ingress is not up yet
                detector = deployment("Detector")
                return detector is not None and str(detector.status.value) == "DEPLOY_FAILED"

            wait_until(detector_failed, 400, 0.5, "the Detector to fail to start")
            yield {"url": url, "config": config, "seen": seen, "tmp": tmp}
        finally:
            stop_serve()


def post(url, path, body=None, *, raw: bytes | None = None, auth=AUTH, headers=None, timeout=120):
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{url}{path}", data=data, auth=auth, timeout=timeout,
                         headers={"Content-Type": "application/json", **(headers or {})})


def tasks_body(tasks_json: bytes, label_config: str = LABEL_CONFIG) -> bytes:
    """A /predict body from the JSON text of its task list (built as bytes: fast)."""
    return b'{"tasks":' + tasks_json + b',"label_config":' + json.dumps(label_config).encode() + b"}"


@contextlib.contextmanager
def health_poller(url: str, interval_s: float = 0.05):
    """Polls /health from another thread; yields the list of latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            started = time.monotonic()
            try:
                elapsed, resp = timed_health(url)
                latencies.append(elapsed if resp.status_code == 200 else float("inf"))
            except requests.RequestException:  # no answer within 10 s
                latencies.append(time.monotonic() - started)
            stop.wait(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(20)


def assert_clean_health_body(text: str):
    body = json.loads(text)
    assert body["status"] == "UP" and body["ready"] is False, body
    detail = body["detail"]
    assert "\n" not in detail and "\r" not in detail and len(detail) <= 400, detail
    assert "/" not in detail, detail  # no path, no URL
    for word in FORBIDDEN_IN_HEALTH:
        assert word not in text, (word, text)
    return body


def read_ingress_log(svc) -> str:
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None) or ray._private.worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"replica_{APP}_LabelStudioIngress_*")))


# ------------------------------------------------------------------ /health
def test_health_names_the_problem_in_one_line_without_secrets_or_internals(svc):
    url = svc["url"]
    raw = deployment("Detector").message
    # What Serve holds (and /health used to return): the whole traceback, with
    # the checkpoint URL, local paths, pid and actor id.
    project_dir = str(Path(__file__).resolve().parents[2])  # wherever the checkout is
    assert "Traceback" in raw and "ModelFileError" in raw and "127.0.0.1:9" in raw and project_dir in raw, raw
    ids = set(re.findall(r"pid=(\d+)", raw)) | set(re.findall(r"actor_id=(\w+)", raw))
    ids |= set(re.findall(r"Replica\(id='(\w+)'", raw)) | set(re.findall(r"replica_id=(\w+)", raw))
    assert ids, raw

    # Every /health answer while the Detector was starting and failing.
    answered = [s for s in svc["seen"] if s[1] == 200]
    assert len(answered) >= 5, svc["seen"][:3]
    for elapsed, _, text in answered:
        assert_clean_health_body(text)
    # The first answer also waited for the proxy to reach the new ingress replica (~2-3 s here).
    slow = [(elapsed, text) for elapsed, _, text in answered[1:] if elapsed >= HEALTH_LIMIT_S]
    assert not slow, slow

    def failure_reported():
        _, resp = timed_health(url)
        body = resp.json()
        # (/health refreshes its view every 2 s: it may still say UPDATING, with the same detail.)
        return body if body.get("detector_status") == "DEPLOY_FAILED" else None

    body = wait_until(failure_reported, 30, 0.5, "/health to report the Detector's failure")
    assert body["detail"] == MODEL_FILE_DETAIL and body["ready"] is False
    for _ in range(5):
        elapsed, resp = timed_health(url)
        assert elapsed < HEALTH_LIMIT_S
        assert_clean_health_body(resp.text)
        assert not any(i in resp.text for i in ids), (ids, resp.text)

    # The whole message is in the ingress's log (credentials masked), once per
    # problem: polling /health over several refreshes adds no line.
    heading = "Detector failed to start: "
    before = read_ingress_log(svc)
    assert heading in before and "ModelFileError: cannot download checkpoint_file" in before
    assert "user:pw" not in before
    deadline = time.monotonic() + 7  # > 3 refreshes (HEALTH_REFRESH_S = 2)
    while time.monotonic() < deadline:
        timed_health(url)
        time.sleep(0.25)
    assert read_ingress_log(svc).count(heading) == before.count(heading)


# ------------------------------------------------------------------ access
def test_api_docs_are_off(svc):
    url = svc["url"]
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        for auth in (None, AUTH):
            resp = requests.get(f"{url}{path}", auth=auth, timeout=10)
            assert resp.status_code == 404, (path, resp.status_code, resp.text[:200])
            assert "swagger" not in resp.text.lower() and "openapi" not in resp.text.lower()


def test_basic_auth_scheme_is_case_insensitive(svc):
    url = svc["url"]
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()
    wrong = base64.b64encode(f"{AUTH_USER}:nope".encode()).decode()
    for scheme in ("Basic", "basic", "BASIC", "bAsIc"):
        resp = requests.post(f"{url}/webhook", json={"action": "PING"}, timeout=10,
                             headers={"Authorization": f"{scheme} {token}"})
        assert resp.status_code == 200, (scheme, resp.text)
        assert resp.json()["status"] == "ok"
    for header in (f"basic {wrong}", f"BASIC {wrong}", f"Bearer {token}", f"basicx {token}", "basic", f"{token}"):
        resp = requests.post(f"{url}/webhook", json={"action": "PING"}, timeout=10, headers={"Authorization": header})
        assert resp.status_code == 401, (header, resp.status_code)
        assert resp.json() == {"status": "error", "error": "authentication required"}


# ------------------------------------------------------------------ label config
def test_region_tags_are_capped_per_label_config(svc):
    url = svc["url"]

    def config(n):
        tags = "".join(f'<RectangleLabels name="l{i}" toName="image"><Label value="Car"/></RectangleLabels>'
                       for i in range(n))
        return f'<View><Image name="image" value="$image"/>{tags}</View>'

    message = ("label config not usable: label config has 3000 region tags (<RectangleLabels>, <PolygonLabels>, "
               "<BrushLabels>); at most 16 are supported in one config (each tag repeats every detection as its own "
               "regions)")
    resp = post(url, "/predict", {"tasks": [task(1, "/data/upload/1/a.png")], "label_config": config(3000)})
    assert resp.status_code == 400 and resp.json() == {"status": "error", "error": message}
    resp = post(url, "/setup", {"project": "3.1", "schema": config(3000)})
    assert resp.status_code == 400 and resp.json() == {"status": "error", "error": message}
    ok = post(url, "/predict", {"tasks": [{"id": 1}], "label_config": config(16)})
    assert ok.status_code == 200 and ok.json()["results"][0]["error_reason"] == "bad_task"


# ------------------------------------------------------------------ answer size
def overflow_item(model_version: str) -> bytes:
    item = {"error": f"one call takes {LIMIT} tasks; ask again", "error_reason": "too_many_tasks",
            "retriable": True, "model_version": model_version}
    return json.dumps(item, separators=(",", ":")).encode()


def test_tasks_past_the_limit_get_one_compact_item_each(svc):
    url = svc["url"]
    version = requests.get(f"{url}/health", timeout=5).json()["model_version"]
    # Label Studio-like tasks past the limit, bad ones inside it.
    tasks = [{"id": i, "meta": {}} for i in range(LIMIT)]
    tasks += [ls_task(i, f"/data/upload/1/{i}.png") for i in range(LIMIT, 10_000)]
    body = tasks_body(json.dumps(tasks).encode())
    resp = post(url, "/predict", raw=body)
    assert resp.status_code == 200, resp.text[:300]
    results = resp.json()["results"]
    assert len(results) == 10_000
    for item in results[:LIMIT]:  # bad tasks in the processed part keep their own message
        assert item == {"error": 'task has no "data" object', "error_reason": "bad_task", "retriable": False,
                        "model_version": version}
    compact = json.loads(overflow_item(version))
    assert all(item == compact for item in results[LIMIT:])
    assert len(resp.content) <= RESPONSE_BYTES_PER_BODY_BYTE * len(body) + RESPONSE_SLACK_BYTES
    assert len(overflow_item(version)) < 160


def test_per_task_messages_are_bounded(svc):
    # A data key of 5000 characters (from the label config) is quoted in each bad task's message.
    key = "k" * 5000
    config = LABEL_CONFIG.replace('value="$image"', f'value="${key}"')
    resp = post(svc["url"], "/predict", {"tasks": [task(1, "x")] * 3, "label_config": config})
    assert resp.status_code == 200
    for item in resp.json()["results"]:
        assert item["error_reason"] == "bad_task"
        assert len(item["error"]) == MAX_ERROR_CHARS and item["error"].startswith('task data has no "kkk')
        assert item["error"].endswith("...")


def test_requests_too_large_to_answer_compactly_get_one_413(svc):
    url = svc["url"]
    per_call = f"one call may carry at most {LIMIT} tasks"
    with health_poller(url) as latencies:
        # The case: 5.7 MiB of {} tasks answered with 385 MiB, stalling /health for 12 s.
        bomb = tasks_body(b"[" + b",".join([b"{}"] * 2_000_000) + b"]")
        assert 5.7 * 2**20 < len(bomb) < 5.8 * 2**20
        started = time.monotonic()
        resp = post(url, "/predict", raw=bomb)
        assert time.monotonic() - started < 10
        assert resp.status_code == 413 and len(resp.content) < 1000
        assert resp.json() == {"status": "error", "error": f"request body holds more than {MAX_BODY_JSON_VALUES} "
                                                           f"JSON values; {per_call}: send the rest in later calls"}
        # Under the value cap, but its 599,000 overflow items would pass 4 x 1.8 MB + 1 MiB.
        small = tasks_body(b"[" + b",".join([b"{}"] * 600_000) + b"]")
        resp = post(url, "/predict", raw=small)
        assert resp.status_code == 413 and len(resp.content) < 1000
        assert resp.json() == {"status": "error", "error": f"too many tasks in one request (600000): {per_call} with "
                                                           "this label config; send the rest in later calls"}
        # 32 MiB of [] (parsing alone held the GIL for 2 s): refused from its bytes, before parsing.
        lists = tasks_body(b"[" + b",".join([b"[]"] * 11_000_000) + b"]")
        assert len(lists) < 32 * 2**20
        started = time.monotonic()
        resp = post(url, "/predict", raw=lists)
        assert time.monotonic() - started < 20
        assert resp.status_code == 413 and "JSON values" in resp.json()["error"] and per_call in resp.json()["error"]
        time.sleep(0.5)
    assert len(latencies) >= 10 and max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]


def test_health_answers_while_the_largest_answerable_request_is_processed(svc):
    """~32 MiB of tiny tasks, sized to just fit every bound: about 800,000
    tasks, 1000 processed (all bad), the rest one compact item each: a
    ~125 MB answer, parsed, assembled and rendered off the event loop."""
    url = svc["url"]
    version = requests.get(f"{url}/health", timeout=5).json()["model_version"]
    item = b"," + overflow_item(version)
    n = 32 * 2**20 * 97 // 100 // 41
    tasks = b"[" + b",".join(b'{"id":"%031d"}' % i for i in range(n)) + b"]"  # 41 bytes, 2 JSON values
    body = tasks_body(tasks)
    budget = RESPONSE_BYTES_PER_BODY_BYTE * len(body) + RESPONSE_SLACK_BYTES
    # The request is as large as the bounds allow: under each, not far from it.
    assert 0.95 * 32 * 2**20 < len(body) < 32 * 2**20
    assert body.count(b",") + body.count(b"[") + body.count(b"{") < MAX_BODY_JSON_VALUES
    assert 0.9 * budget < (n - LIMIT) * len(item) <= budget
    with health_poller(url) as latencies:
        time.sleep(0.3)
        started = time.monotonic()
        resp = post(url, "/predict", raw=body, timeout=300)
        took = time.monotonic() - started
        time.sleep(0.3)
    assert resp.status_code == 200, resp.text[:300]
    content = resp.content
    polled_during = len(latencies)
    print(f"largest answerable request: {len(body)} bytes in, {len(content)} bytes out, {took:.1f} s; "
          f"{polled_during} /health polls, slowest {max(latencies):.3f} s")
    assert polled_during >= 10, (took, polled_during)
    assert max(latencies) < HEALTH_LIMIT_S, (took, sorted(latencies)[-5:])
    assert content.startswith(b'{"results":[{"error":"task has no \\"data\\" object","error_reason":"bad_task"')
    assert content.endswith(b'],"model_version":' + json.dumps(version).encode() + b"}")
    assert content.count(b'"error_reason":"bad_task"') == LIMIT
    assert content.count(item) == n - LIMIT
    assert len(content) <= budget + LIMIT * 200  # 4 x body + 1 MiB + the processed part
