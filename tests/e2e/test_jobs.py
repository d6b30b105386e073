"""Pre-annotating whole projects, end to end: a real Label Studio 1.23.2, the
shipped serve_config.yaml started as the README starts it (settings from the
environment), the trained toy detector, and what Label Studio stores.

One Label Studio and one service for the module; each scenario has its own
project. The service reaches Label Studio through a small proxy that can be
told to refuse the prediction write-back (401 or 500), and is secured as an
operator would run it: basic auth on (Label Studio connects with it),
JOBS_TOKEN for the jobs API, WEBHOOK_SECRET for Label Studio's webhook.

Cost: Label Studio start ~10 s, the service ~40 s, then about 1,600 toy
images (~3-4 minutes on 2 cores).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from serve_fixtures import free_port, replica_pids, serve_config_for_test, wait_until
from test_labelstudio_e2e import LABEL_CONFIG, SCENES, SceneImage, assert_prediction_matches, scene_png

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
BASIC = ("annotator-backend", "basic-auth-password-123")
JOBS_TOKEN = "jobs-token-0123456789abcdef"
WEBHOOK_SECRET = "webhook-secret-0123456789abcdef"
PREDICT_TIMEOUT_S = 4.0
SWEEP_S = 20.0
KINDS = tuple(k for k in SCENES if k != "missing")  # held-out scenes the toy finds exactly


# ---------------------------------------------------------------- Label Studio side
class LabelStudioFaults:
    """Reverse proxy in front of Label Studio for the service: forwards every
    request, except that the prediction import can be made to answer
    `refuse_imports` (401 or 500) without reaching Label Studio."""

    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.refuse_imports: int | None = None
        self.imports = 0
        session = requests.Session()
        session.trust_env = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.split("?")[0].endswith("/import/predictions") and self.command == "POST":
                    proxy.imports += 1
                    if proxy.refuse_imports:
                        self._answer(proxy.refuse_imports, b'{"detail": "refused by the test proxy"}',
                                     "application/json")
                        return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "authorization", "accept")}
                resp = session.request(self.command, proxy.target + self.path, data=body or None,
                                       headers=headers, timeout=120, allow_redirects=False)
                self._answer(resp.status_code, resp.content, resp.headers.get("Content-Type", "application/json"))

            def _answer(self, status, content, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scenes(tmp_path_factory, image_server) -> dict:
    """The held-out scenes on a local image server: kind -> (url, SceneImage)."""
    root = tmp_path_factory.mktemp("job-images")
    server = image_server(root)
    out = {}
    for kind in KINDS:
        image = scene_png(kind)
        (root / image.name).write_bytes(image.data)
        out[kind] = (f"{server.url}/{image.name}", image)
    out["url_of_missing"] = f"{server.url}/no-such-image.png"
    return out


@pytest.fixture(scope="module")
def service(ls, ray_serve, tmp_path_factory):
    """The shipped serve_config.yaml, settings from the environment."""
    faults = LabelStudioFaults(ls.url)
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "ls-key").write_text(ls.client.legacy_token())
    env = pytest.MonkeyPatch()
    for name, value in {
        "CONFIG_FILE": str(TOY_CONFIG), "CHECKPOINT_FILE": str(TOY_CHECKPOINT),
        "LABEL_STUDIO_URL": faults.url, "LABEL_STUDIO_API_KEY_FILE": str(secrets / "ls-key"),
        "BASIC_AUTH_USER": BASIC[0], "BASIC_AUTH_PASS": BASIC[1],
        "JOBS_TOKEN": JOBS_TOKEN, "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }.items():
        env.setenv(name, value)  # before Ray starts: replicas inherit it
    try:
        port = free_port()
        config = serve_config_for_test(port, {
            "allowed_hosts": ["127.0.0.1"], "predict_timeout_s": PREDICT_TIMEOUT_S,
            "annotate_new_tasks": True, "annotate_sweep_interval_s": SWEEP_S,
        })
        url = ray_serve(config=config, wait=False)
        wait_until(lambda: requests.get(f"{url}/health", timeout=2).json().get("ready"), 240, what="ready")
        health = requests.get(f"{url}/health", timeout=5).json()
        yield {"url": url, "model_version": health["model_version"], "faults": faults}
    finally:
        faults.close()
        env.undo()


def jobs_api(service, method: str, path: str = "", **kw) -> requests.Response:
    return requests.request(method, f"{service['url']}/jobs{path}", timeout=30,
                            headers={"Authorization": f"Bearer {JOBS_TOKEN}"}, **kw)


def make_project(ls, scenes, title: str, n_tasks: int, missing: int = 0) -> tuple[int, dict[int, SceneImage]]:
    """A project of n_tasks image-URL tasks over the held-out scenes (and
    `missing` tasks whose image answers 404); task id -> expected scene."""
    project = ls.client.create_project(LABEL_CONFIG, title=title)["id"]
    kinds = [KINDS[i % len(KINDS)] for i in range(n_tasks)]
    data = [{"image": scenes[k][0]} for k in kinds] + [{"image": scenes["url_of_missing"]}] * missing
    ids = []
    for start in range(0, len(data), 200):
        ids += ls.client.import_tasks(project, data[start:start + 200])["task_ids"]
    expected = {tid: (scenes[k][1] if i < n_tasks else None) for i, (tid, k) in
                enumerate(zip(ids, kinds + [None] * missing))}
    return project, expected


def connect(ls, service, project: int) -> dict:
    """Connect the service to the project as a user does, with basic auth, and
    give Label Studio's webhook for it the secret (it sends no auth header)."""
    ml = ls.client.add_ml_backend(project, service["url"], title="mmdet", auth_method="BASIC_AUTH",
                                  basic_auth_user=BASIC[0], basic_auth_pass=BASIC[1])
    assert ml["state"] == "CO", ml
    return ml


def stored(ls, project: int) -> dict[int, list[dict]]:
    """Task id -> the predictions Label Studio stored for it."""
    out: dict[int, list[dict]] = {}
    for prediction in ls.client.get("/api/predictions", params={"project": project}):
        out.setdefault(prediction["task"], []).append(prediction)
    return out


def assert_exactly_one_each(ls, project: int, expected: dict, model_version: str, sample: int = 8) -> None:
    predictions = stored(ls, project)
    counts = {tid: len(predictions.get(tid, [])) for tid in expected}
    wrong = {tid: n for tid, n in counts.items() if n != (0 if expected[tid] is None else 1)}
    assert not wrong, f"tasks without exactly one prediction (task: count): {dict(list(wrong.items())[:20])}"
    checked = [tid for tid in expected if expected[tid] is not None][:: max(1, len(expected) // sample)]
    for tid in checked:
        assert_prediction_matches(predictions[tid][0], expected[tid], model_version)


def wait_job(service, job_id: str, timeout_s: float = 300, states=("done", "failed", "cancelled", "lost")) -> dict:
    seen = []

    def finished():
        job = jobs_api(service, "GET", f"/{job_id}").json()["job"]
        if not seen or seen[-1] != job["state"]:
            seen.append(job["state"])
        return job if job["state"] in states else None

    job = wait_until(finished, timeout_s, interval_s=0.3, what=f"job {job_id}")
    job["_states_seen"] = seen
    return job


def job_runner_logs() -> list[Path]:
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None) or ray._private.worker._global_node
    return sorted((Path(node.get_session_dir_path()) / "logs" / "serve").glob("replica_*JobRunner*.log"))


# ------------------------------------------------------------------- tests
def test_jobs_api_needs_authentication(service):
    assert requests.get(f"{service['url']}/jobs", timeout=10).status_code == 401
    wrong = requests.get(f"{service['url']}/jobs", headers={"Authorization": "Bearer not-the-token-000000"},
                         timeout=10)
    assert wrong.status_code == 401
    assert jobs_api(service, "GET").status_code == 200
    assert requests.get(f"{service['url']}/jobs", auth=BASIC, timeout=10).status_code == 200


def test_retrieve_predictions_finishes_in_background(ls, service, scenes):
    """300 tasks, one "Retrieve predictions", predict_timeout_s 4 s: what is not
    done in time is predicted in the background and written back; a second
    click during the run and a third after it add nothing."""
    project, expected = make_project(ls, scenes, "background completion", 300)
    connect(ls, service, project)
    started = time.monotonic()
    first = ls.client.retrieve_predictions(project)
    assert first.status_code == 200, first.text
    assert time.monotonic() - started < PREDICT_TIMEOUT_S + 30  # answered in time, not after all 300
    second = ls.client.retrieve_predictions(project)  # while the background job runs
    assert second.status_code == 200, second.text
    waiting = [tid for tid in sorted(expected, reverse=True) if tid not in stored(ls, project)][:3]
    for tid in waiting:  # an annotator opens tasks still queued in the background
        ls.client.get_task(tid)

    def all_there():
        return len(stored(ls, project)) == len(expected)

    wait_until(all_there, 300, interval_s=2, what="every task predicted")

    def background_jobs():
        jobs = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project]
        return jobs if all(j["state"] == "done" for j in jobs) else None

    jobs = wait_until(background_jobs, 60, what="background jobs done")
    assert {j["kind"] for j in jobs} == {"background"}, jobs  # nothing else did the work
    assert all(j["done"] == j["total"] and j["failed"] == 0 for j in jobs), jobs
    written = sum(j["written"] for j in jobs)
    assert 150 < written < 300, jobs  # most, not all, were finished in the background
    third = ls.client.retrieve_predictions(project)
    assert third.status_code == 200
    time.sleep(PREDICT_TIMEOUT_S + 2)
    assert_exactly_one_each(ls, project, expected, service["model_version"])


def test_bulk_job_from_the_command_line(ls, service, scenes):
    """`make annotate`'s script over a 300-task project: done = total, the
    progress bar in its output; GET /jobs/{id} went through its states."""
    project, expected = make_project(ls, scenes, "bulk from the CLI", 300)
    env = {**os.environ, "JOBS_TOKEN": JOBS_TOKEN, "MODEL_URL": service["url"]}
    env.pop("BASIC_AUTH_USER", None), env.pop("BASIC_AUTH_PASS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "annotate.py"), "--project", str(project),
                             "--poll-s", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    states = []
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        jobs = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project]
        if jobs and (not states or states[-1] != jobs[0]["state"]):
            states.append(jobs[0]["state"])
        time.sleep(0.2)
    out, err = proc.communicate(timeout=30)
    final = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project][0]["state"]
    if states[-1:] != [final]:  # the client saw "done" after this loop's last look
        states.append(final)
    assert proc.returncode == 0, (out, err[-3000:])
    assert "300/300" in err and "done" in out, (out, err[-3000:])
    assert "running" in states and states[-1] == "done", states
    (job,) = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project]
    assert (job["total"], job["done"], job["failed"], job["written"]) == (300, 300, 0, 300), job
    assert job["images_per_s"] and job["images_per_s"] > 0
    assert_exactly_one_each(ls, project, expected, service["model_version"])
    # One log line per state change, none per task; counters on /metrics.
    lines = [line for path in job_runner_logs() for line in path.read_text(errors="replace").splitlines()
             if f"job {job['id']} " in line]
    assert 2 <= len(lines) <= 6, lines

    def written_counter():
        text = requests.get(f"{service['url']}/metrics", auth=BASIC, timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("ray_mmdet_ls_job_tasks_total{") and 'outcome="written"' in line]
        return sum(values) >= 300

    wait_until(written_counter, 60, interval_s=2, what="ray_mmdet_ls_job_tasks_total{outcome=written} >= 300")
    # Run again: nothing left to predict, nothing written twice.
    again = wait_job(service, jobs_api(service, "POST", json={"project": project}).json()["job"]["id"])
    assert (again["state"], again["total"], again["written"]) == ("done", 0, 0), again


def test_missing_image_is_reported_and_does_not_stop_the_job(ls, service, scenes):
    project, expected = make_project(ls, scenes, "one missing image", 20, missing=1)
    answer = jobs_api(service, "POST", json={"project": project})
    assert answer.status_code == 202, answer.text
    job = wait_job(service, answer.json()["job"]["id"])
    assert (job["state"], job["done"], job["failed"]) == ("done", 20, 1), job
    (failure,) = job["failures"]
    assert failure["task"] == max(expected) and failure["reason"] == "http_404", failure
    assert_exactly_one_each(ls, project, expected, service["model_version"])


def test_cancel_stops_the_job_and_keeps_what_was_written(ls, service, scenes):
    project, expected = make_project(ls, scenes, "cancelled", 300)
    job_id = jobs_api(service, "POST", json={"project": project}).json()["job"]["id"]
    wait_until(lambda: jobs_api(service, "GET", f"/{job_id}").json()["job"]["done"] >= 20, 120, interval_s=0.2,
               what="20 done")
    assert jobs_api(service, "DELETE", f"/{job_id}").json()["job"]["state"] in ("cancelling", "cancelled")
    job = wait_job(service, job_id, 60)
    assert job["state"] == "cancelled" and job["done"] < 300, job
    time.sleep(3)  # nothing goes on being written after the end
    assert sum(len(v) for v in stored(ls, project).values()) == job["written"] == job["done"], job


def test_write_back_refused_fails_the_job_loudly(ls, service, scenes):
    """Label Studio answering 500 (after retries) or 401 to the write-back
    fails the job with the status in its message; nothing counts as done that
    Label Studio did not store; a later run does the work."""
    project, expected = make_project(ls, scenes, "write-back refused", 30)
    faults = service["faults"]
    try:
        for status in (500, 401):
            faults.refuse_imports = status
            job = wait_job(service, jobs_api(service, "POST", json={"project": project}).json()["job"]["id"], 120)
            assert job["state"] == "failed" and str(status) in job["message"], job
            assert job["done"] == job["written"] == 0, job
            assert not stored(ls, project)
    finally:
        faults.refuse_imports = None
    job = wait_job(service, jobs_api(service, "POST", json={"project": project}).json()["job"]["id"])
    assert (job["state"], job["done"]) == ("done", 30), job
    assert_exactly_one_each(ls, project, expected, service["model_version"])


def kill_mid_job(ls, service, scenes, title: str, deployment: str) -> tuple[int, dict, str]:
    """A 200-task job; once 20 are done, a replica of the deployment is SIGKILLed
    (the shipped CPU config runs two Detector replicas and one JobRunner)."""
    project, expected = make_project(ls, scenes, title, 200)
    job_id = jobs_api(service, "POST", json={"project": project}).json()["job"]["id"]
    wait_until(lambda: jobs_api(service, "GET", f"/{job_id}").json()["job"]["done"] >= 20, 120, interval_s=0.2,
               what="20 done")
    pids = replica_pids(deployment)
    assert len(pids) == (2 if deployment == "Detector" else 1), pids
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    return project, expected, job_id


def test_detector_killed_mid_job_loses_and_duplicates_nothing(ls, service, scenes):
    project, expected, job_id = kill_mid_job(ls, service, scenes, "detector killed", "Detector")
    first = wait_job(service, job_id, 400)
    assert first["state"] == "done", first  # tasks that failed with the replica are listed, not lost
    rerun = wait_job(service, jobs_api(service, "POST", json={"project": project}).json()["job"]["id"], 400)
    assert rerun["state"] == "done" and rerun["total"] == first["failed"], (first, rerun)
    assert_exactly_one_each(ls, project, expected, service["model_version"])


def test_job_runner_killed_mid_job_says_lost_and_a_rerun_resumes(ls, service, scenes):
    project, expected, job_id = kill_mid_job(ls, service, scenes, "job runner killed", "JobRunner")

    def lost():
        answer = jobs_api(service, "GET", f"/{job_id}")
        return answer.json()["job"] if answer.status_code == 200 and answer.json()["job"]["state"] == "lost" else None

    job = wait_until(lost, 120, what="the job reported lost")
    assert "make annotate PROJECT=" in job["message"], job
    rerun = wait_job(service, jobs_api(service, "POST", json={"project": project}).json()["job"]["id"], 400)
    assert rerun["state"] == "done", rerun
    assert_exactly_one_each(ls, project, expected, service["model_version"])


def test_new_tasks_are_predicted_without_a_click(ls, service, scenes):
    """annotate_new_tasks: importing 50 tasks into a connected project gets
    them predicted through the TASKS_CREATED webhook (basic auth is on: the
    webhook carries WEBHOOK_SECRET instead); tasks whose webhook never came
    are caught by the sweep."""
    project = ls.client.create_project(LABEL_CONFIG, title="new tasks")["id"]
    connect(ls, service, project)
    webhooks = ls.client.get("/api/webhooks", params={"project": project})
    (hook,) = [h for h in webhooks if h["url"].rstrip("/").endswith("/webhook")]
    ls.client.patch(f"/api/webhooks/{hook['id']}", {"headers": {"X-Webhook-Secret": WEBHOOK_SECRET}})
    kinds = [KINDS[i % len(KINDS)] for i in range(60)]
    ids = ls.client.import_tasks(project, [{"image": scenes[k][0]} for k in kinds[:50]])["task_ids"]
    expected = {tid: scenes[k][1] for tid, k in zip(ids, kinds)}
    wait_until(lambda: len(stored(ls, project)) == 50, 120, interval_s=1, what="50 new tasks predicted")
    jobs = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project]
    assert any(j["kind"] == "new_tasks" and j["selection"] == "50 tasks" for j in jobs), jobs
    # A webhook that never arrives: the sweep predicts those tasks.
    ls.client.patch(f"/api/webhooks/{hook['id']}", {"is_active": False})
    late = ls.client.import_tasks(project, [{"image": scenes[k][0]} for k in kinds[50:]])["task_ids"]
    expected.update({tid: scenes[k][1] for tid, k in zip(late, kinds[50:])})
    wait_until(lambda: len(stored(ls, project)) == 60, SWEEP_S + 90, interval_s=1, what="the sweep")
    jobs = [j for j in jobs_api(service, "GET").json()["jobs"] if j["project"] == project]
    assert any(j["kind"] == "new_tasks" and j["selection"] == "all" and j["written"] > 0 for j in jobs), jobs
    time.sleep(2)
    assert_exactly_one_each(ls, project, expected, service["model_version"])
