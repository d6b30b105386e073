"""scripts/annotate.py, the bulk pre-annotation client, run as a subprocess
against a stand-in for the service's /jobs HTTP API (a stdlib server in a
thread whose job advances one scripted snapshot per poll)."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "annotate.py"
SECRET_ENV = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "BASIC_AUTH_PASS_FILE", "JOBS_TOKEN", "JOBS_TOKEN_FILE", "MODEL_URL")


def job(state="running", done=0, total=300, failed=0, failures=(), message=None, job_id="job-1", **extra):
    """A JOB as the service shows it: `done` (tasks holding a prediction), `failed` and `skipped` add up
    to the tasks finished."""
    return {"id": job_id, "kind": "bulk", "project": 12, "model_version": "rtmdet-tiny", "state": state,
            "total": total, "done": done, "failed": failed, "skipped": 0, "written": done,
            "failures": list(failures),
            "images_per_s": 3.1 if state == "running" else None, "eta_s": 48.0 if state == "running" else None,
            "message": message, "created_at": 1000.0, "finished_at": 1097.0 if state == "done" else None, **extra}


def progressing(total=300, steps=3, failed=0, failures=()):
    """queued, then `steps` running snapshots with growing counts, then done."""
    running = [job(done=total * i // (steps + 1)) for i in range(1, steps + 1)]
    return [job("queued", total=None), *running,
            job("done", done=total - failed, failed=failed, failures=failures)]


class JobsService(ThreadingHTTPServer):
    """POST /jobs answers the first snapshot (or a 409 with `conflict`); each
    GET /jobs/{id} the next one, then the last one forever."""

    daemon_threads = True

    def __init__(self, snapshots, conflict=None, authorization=None, unavailable_after=None, forbidden=None):
        super().__init__(("127.0.0.1", 0), JobsHandler)
        self.snapshots, self.conflict, self.authorization = snapshots, conflict, authorization
        self.forbidden = forbidden  # the error of a 403 to every call (a service with no auth configured)
        self.unavailable_after = unavailable_after  # GETs answered before 503s start (a restart)
        self.requests: list[tuple[str, str, dict, object]] = []
        self.gets = 0
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class JobsHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def answer(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def handle_any(self):
        service: JobsService = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with service.lock:
            service.requests.append((self.command, self.path, dict(self.headers), body))
        if service.forbidden:
            return self.answer(403, {"status": "error", "error": service.forbidden})
        if service.authorization and self.headers.get("Authorization") != service.authorization:
            return self.answer(401, {"status": "error", "error": "authentication required"})
        if self.command == "POST" and self.path == "/jobs":
            if service.conflict:
                return self.answer(409, {"status": "error", "error": "a job for project 12 is running",
                                         "job": service.conflict})
            return self.answer(202, {"job": service.snapshots[0]})
        if self.command == "GET" and self.path == "/jobs":
            return self.answer(200, {"jobs": [service.snapshots[-1]]})
        if self.command == "DELETE" and self.path.startswith("/jobs/"):
            return self.answer(200, {"job": service.snapshots[0]})
        if self.command == "GET" and self.path.startswith("/jobs/"):
            with service.lock:
                service.gets += 1
                index = service.gets
            if service.unavailable_after is not None and index > service.unavailable_after:
                return self.answer(503, {"error": "restarting"})
            return self.answer(200, {"job": service.snapshots[min(index, len(service.snapshots) - 1)]})
        return self.answer(404, {"status": "error", "error": "not found"})

    do_GET = do_POST = do_DELETE = handle_any


def cli_env(**env):
    clean = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return {**clean, **env}


def annotate(*args, env=None, timeout=15):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**(env or {})), stdin=subprocess.DEVNULL)


def progress_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("project 12 [")]


def done_counts(lines):
    return [int(line.split("] ")[1].split("/")[0]) for line in lines]


def test_follows_a_job_to_done_and_draws_its_progress():
    with JobsService(progressing()) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2", "--log-every-s", "0")
    assert result.returncode == 0, result.stderr
    lines = progress_lines(result.stderr)
    counts = done_counts(lines)
    assert counts == sorted(counts) and counts[0] < counts[-1] == 300 and len(set(counts)) >= 4
    assert lines[-1] == "project 12 [##############################] 300/300 tasks, 300 done, 0 failed (done)"
    assert "3.1 img/s, ETA 48 s (running)" in result.stderr
    assert ("job job-1 (project 12, model rtmdet-tiny) done: 300 done, 0 failed of 300 tasks; "
            "300 predictions written in 97 s") in result.stdout
    method, path, headers, body = service.requests[0]
    assert (method, path, body) == ("POST", "/jobs", {"project": 12})
    assert "Authorization" not in headers


def test_failed_tasks_exit_1_and_are_listed():
    failures = [{"task": 17 + i, "reason": "image_missing", "message": f"404 for image {i}"} for i in range(25)]
    with JobsService(progressing(failed=30, failures=failures)) as service:
        result = annotate("--project", "12", "--tasks", "1, 2,3,2", "--url", service.url, "--poll-s", "0.2")
    assert result.returncode == 1, result.stderr
    assert "task 17: image_missing: 404 for image 0" in result.stdout
    assert "task 36: image_missing" in result.stdout and "task 37:" not in result.stdout  # at most 20 shown
    assert "... and 10 more failed tasks" in result.stdout
    assert service.requests[0][3] == {"project": 12, "task_ids": [1, 2, 3]}


@pytest.mark.parametrize("state", ["failed", "lost", "cancelled"])
def test_a_job_that_ends_badly_exits_1_with_its_message(state):
    message = "Label Studio stopped answering; run `make annotate PROJECT=12` again to resume"
    with JobsService([job("running", done=5), job(state, done=10, message=message)]) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2")
    assert result.returncode == 1 and message in result.stdout and f" {state}: 10 done, 0 failed" in result.stdout


def test_a_running_job_of_the_project_is_followed_instead():
    running = job("running", done=100, job_id="job-7")
    with JobsService([running, job("done", done=300, job_id="job-7")], conflict=running) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2")
    assert result.returncode == 0, result.stderr
    assert "already has job job-7 running" in result.stderr
    assert [(m, p) for m, p, _, _ in service.requests][1:] == [("GET", "/jobs/job-7")]


@pytest.mark.parametrize("env, expected", [
    ({"BASIC_AUTH_USER": "alice", "BASIC_AUTH_PASS": "s3cret-pw"}, "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()),
    ({"JOBS_TOKEN": "tok-s3cret"}, "Bearer tok-s3cret"),
])
def test_credentials_are_sent_and_never_printed(env, expected):
    with JobsService(progressing(steps=1), authorization=expected) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2", "--log-every-s", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert {headers.get("Authorization") for _, _, headers, _ in service.requests} == {expected}
    secret = env.get("BASIC_AUTH_PASS") or env["JOBS_TOKEN"]
    assert secret not in result.stdout + result.stderr


def test_401_says_which_variables_to_set():
    with JobsService(progressing(), authorization="Bearer right") as service:
        bare = annotate("--project", "12", "--url", service.url)
        wrong = annotate("--project", "12", "--url", service.url, env={"JOBS_TOKEN": "wrong-token"})
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert all(name in bare.stderr for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "JOBS_TOKEN"))
    assert wrong.returncode == 2 and "refused the credentials from JOBS_TOKEN" in wrong.stderr
    assert "wrong-token" not in wrong.stdout + wrong.stderr


def test_403_prints_the_services_reason():
    reason = "the jobs API needs authentication and none is configured: set BASIC_AUTH_USER and BASIC_AUTH_PASS"
    with JobsService(progressing(), forbidden=reason) as service:
        result = annotate("--project", "12", "--url", service.url)
    assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_service_exits_2_quickly():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = annotate("--project", "12", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 2 and "cannot reach the service" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 5


def test_following_gives_up_when_the_service_stops_answering():
    with JobsService([job(done=1), job(done=2)], unavailable_after=1) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2", "--give-up-s", "0.5")
    assert result.returncode == 2 and "gave up" in result.stderr and "make annotate JOB=job-1" in result.stderr
    assert "Traceback" not in result.stderr and 3 <= service.gets <= 6


def test_cancel_sends_delete_and_follows_until_cancelled():
    with JobsService([job("cancelling", done=40), job("cancelled", done=42)]) as service:
        result = annotate("--cancel", "job-1", "--url", service.url, "--poll-s", "0.2")
    assert result.returncode == 0, result.stderr
    assert [(m, p) for m, p, _, _ in service.requests] == [("DELETE", "/jobs/job-1"), ("GET", "/jobs/job-1")]
    assert " cancelled: 42 done" in result.stdout


def test_list_and_no_follow():
    with JobsService([job("running", done=3)]) as service:
        listed = annotate("--list", "--url", service.url)
        started = annotate("--project", "12", "--no-follow", env={"MODEL_URL": service.url})
    assert listed.returncode == 0 and "job-1  bulk  project 12  running  3/300 tasks, 3 done, 0 failed" in listed.stdout
    assert started.returncode == 0 and "make annotate CANCEL=job-1" in started.stdout
    assert [(m, p) for m, p, _, _ in service.requests] == [("GET", "/jobs"), ("POST", "/jobs")]


def test_without_a_terminal_progress_is_not_one_line_per_poll():
    snapshots = [job("queued", total=None)] + [job(done=10 * i) for i in range(1, 9)] + [job("done", done=300)]
    with JobsService(snapshots) as service:
        result = annotate("--project", "12", "--url", service.url, "--poll-s", "0.2")
    assert result.returncode == 0, result.stderr
    lines = progress_lines(result.stderr)
    # The first line, the change to running, the end: not one per poll.
    assert len(lines) <= 4 and service.gets >= 9
    assert lines[-1].endswith("(done)")


def test_ctrl_c_leaves_the_job_running_and_says_how_to_cancel():
    with JobsService([job(done=i) for i in range(1000)]) as service:
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--project", "12", "--url", service.url,
                                    "--poll-s", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=cli_env(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while service.gets < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert "keeps running on the service" in stderr and "make annotate CANCEL=job-1" in stderr


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "--project"),
    (["--project", "12", "--tasks", "1,x"], {}, "--tasks"),
    (["--project", "12", "--poll-s", "0.01"], {}, "--poll-s"),
    (["--project", "12", "--url", "http://user:pw@127.0.0.1:9"], {}, "must not carry credentials"),
    (["--project", "12"], {"BASIC_AUTH_USER": "alice"}, "BASIC_AUTH_PASS is not set"),
    (["--project", "12"], {"JOBS_TOKEN": "tok\nX-Injected: 1"}, "JOBS_TOKEN must be printable ASCII"),
])
def test_usage_errors_exit_2(args, env, message):
    result = annotate(*args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "Injected" not in result.stderr


def load_script():
    spec = importlib.util.spec_from_file_location("annotate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_on_a_terminal_the_bar_is_one_line_redrawn_in_place():
    cli = load_script()
    stream = io.StringIO()
    printer = cli.ProgressPrinter(stream, is_tty=True)
    for snapshot in (job(done=30), job(done=148, failed=2, skipped=1), job(done=300)):
        printer.show(snapshot)
    printer.end_line()
    drawn = stream.getvalue()
    assert drawn.count("\r") == 3 and drawn.count("\n") == 1 and drawn.endswith("\n")
    assert ("project 12 [###############...............] 151/300 tasks, 148 done, 2 failed, 1 skipped, "
            "3.1 img/s, ETA 48 s (running)") in drawn
