#!/usr/bin/env python
"""Pre-annotate a Label Studio project in bulk: start a job on the running
service (`make serve`) and follow it to the end.

    python scripts/annotate.py --project 12                 # every task of project 12
    python scripts/annotate.py --project 12 --tasks 1,2,3   # only these tasks
    python scripts/annotate.py --job JOB_ID                 # follow a job already started
    python scripts/annotate.py --cancel JOB_ID              # cancel a job
    python scripts/annotate.py --list                       # the service's jobs

(or `make annotate PROJECT=12 [TASKS=1,2,3] [URL=...]`, `make annotate CANCEL=<id>`,
`make annotate LIST=1`). The job runs on the service: stopping this command
(Ctrl-C) leaves it running. If the project already has a running job, that
one is followed instead of starting another.

Service URL: --url, else MODEL_URL, else http://127.0.0.1:9090. Credentials
come from the environment the service reads: BASIC_AUTH_USER and
BASIC_AUTH_PASS (or BASIC_AUTH_PASS_FILE) when it has basic auth on, else
JOBS_TOKEN (or JOBS_TOKEN_FILE), sent as a Bearer token.

Exit status: 0 the job is done and no task failed; 1 tasks failed, or the job
failed, was cancelled or lost (its message says how to resume); 2 usage,
authentication or connection errors; 130 interrupted.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9090"
REQUEST_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 4 << 20
MIN_POLL_S = 0.2
GIVE_UP_S = 60.0
# Without a terminal (CI logs) at most one progress line per this many seconds.
PLAIN_LOG_EVERY_S = 5.0
MAX_FAILURES_SHOWN = 20
MAX_SECRET_FILE_BYTES = 16 * 1024
BAR_WIDTH = 30
TERMINAL_STATES = ("done", "failed", "cancelled", "lost")
# Answers worth waiting out while following: a proxy or Serve itself says the
# service is (re)starting.
TRANSIENT_STATUSES = (502, 503, 504)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """Ends the command with a message and exit status 2 (no traceback)."""


class Unreachable(Exception):
    """The service did not answer (refused, timed out, or said it is restarting)."""


class HTTPStatusError(Exception):
    def __init__(self, status: int, body):
        super().__init__(status)
        self.status = status
        self.body = body

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return self.body["error"]
        return f"HTTP {self.status}"


# ------------------------------------------------------------------ credentials
def read_secret(name: str) -> str | None:
    """NAME from the environment, or the file NAME_FILE names (a mounted
    secret), as the service reads it (mmdet_ls/credentials.py)."""
    value = os.environ.get(name, "").strip()
    path = os.environ.get(f"{name}_FILE", "").strip()
    if value and path:
        raise CliError(f"both {name} and {name}_FILE are set: set one")
    if path:
        try:
            with open(path, "rb") as f:
                value = f.read(MAX_SECRET_FILE_BYTES + 1).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"{name}_FILE cannot be read: {type(exc).__name__}") from None
    return value or None


def auth_header() -> tuple[str | None, str]:
    """(the Authorization header or None, which variables it came from).
    Basic wins when both are set: a service with basic auth on asks it of every route."""
    user = os.environ.get("BASIC_AUTH_USER", "").strip() or None
    password = read_secret("BASIC_AUTH_PASS")
    if bool(user) != bool(password):
        missing = "BASIC_AUTH_PASS" if user else "BASIC_AUTH_USER"
        raise CliError(f"basic auth needs both a user and a password: {missing} is not set")
    if user:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return f"Basic {pair}", "BASIC_AUTH_USER/BASIC_AUTH_PASS"
    token = read_secret("JOBS_TOKEN")
    if token and not all(33 <= ord(c) <= 126 for c in token):
        # Checked here: http.client would refuse it with the value in its message.
        raise CliError("JOBS_TOKEN must be printable ASCII without spaces")
    if token:
        return f"Bearer {token}", "JOBS_TOKEN"
    return None, ""


# ------------------------------------------------------------------------ HTTP
class JobsClient:
    def __init__(self, base_url: str, authorization: str | None, credentials_from: str):
        self.base_url = base_url.rstrip("/")
        self.authorization = authorization
        self.credentials_from = credentials_from
        # No proxies from the environment: the service is usually local, and
        # a corporate proxy would see the credentials.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer of a 2xx; HTTPStatusError for other statuses,
        Unreachable when there is no answer worth reading."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.authorization:
            request.add_header("Authorization", self.authorization)
        try:
            with self.opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
                return self._json(response.read(MAX_RESPONSE_BYTES + 1), response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw = exc.read(MAX_RESPONSE_BYTES + 1)
            except OSError:
                raw = b""
            finally:
                exc.close()
            if status in TRANSIENT_STATUSES:
                raise Unreachable(f"HTTP {status}") from None
            try:
                parsed = json.loads(raw[:MAX_RESPONSE_BYTES])
            except ValueError:
                parsed = None
            raise HTTPStatusError(status, parsed) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, reset
            reason = getattr(exc, "reason", exc)
            raise Unreachable(str(reason) or type(reason).__name__) from None

    def _json(self, raw: bytes, status: int) -> dict:
        if len(raw) > MAX_RESPONSE_BYTES:
            raise CliError(f"the service's answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB")
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise CliError(f"the service answered HTTP {status} with something that is not JSON: "
                           f"is {self.base_url} the ML backend?") from None
        if not isinstance(parsed, dict):
            raise CliError(f"the service answered HTTP {status} with unexpected JSON")
        return parsed

    def explain(self, exc: HTTPStatusError) -> CliError:
        """What a refused call tells the user (never the secret itself)."""
        if exc.status == 401:
            if self.authorization:
                return CliError(f"the service refused the credentials from {self.credentials_from} (HTTP 401): "
                                "check they are the ones the service was started with")
            return CliError("the service asks for credentials (HTTP 401): set BASIC_AUTH_USER and BASIC_AUTH_PASS "
                            "to the service's basic-auth credentials, or JOBS_TOKEN to its jobs token")
        if exc.status == 404 and exc.error == "HTTP 404":
            return CliError(f"{self.base_url} has no /jobs API (HTTP 404): is it this ML backend, and up to date?")
        return CliError(f"the service answered HTTP {exc.status}: {exc.error}")


def job_of(answer: dict) -> dict:
    job = answer.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("id"), str):
        raise CliError("the service's answer carries no job")
    return job


# -------------------------------------------------------------------- display
def number(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def finished_tasks(job: dict) -> int:
    """Tasks the job is through with: `done` (holding a prediction), `failed`, `skipped`."""
    return number(job.get("done")) + number(job.get("failed")) + number(job.get("skipped"))


def counts(job: dict) -> str:
    text = f"{number(job.get('done'))} done, {number(job.get('failed'))} failed"
    skipped = number(job.get("skipped"))
    return text + (f", {skipped} skipped" if skipped else "")


def progress_line(job: dict) -> str:
    """`project 12 [#########.........] 150/300 tasks, 148 done, 2 failed, 3.1 img/s, ETA 48 s (running)`."""
    finished, total = finished_tasks(job), job.get("total")
    if isinstance(total, int) and total > 0:
        filled = min(BAR_WIDTH, BAR_WIDTH * finished // total)
        bar, of_total = "#" * filled + "." * (BAR_WIDTH - filled), f"{finished}/{total}"
    else:  # the service is still listing the project's tasks (or has none to predict)
        bar, of_total = "." * BAR_WIDTH, f"{finished}/{total if isinstance(total, int) else '?'}"
    parts = [f"project {job.get('project')} [{bar}] {of_total} tasks", counts(job)]
    rate, eta = job.get("images_per_s"), job.get("eta_s")
    if isinstance(rate, (int, float)) and job.get("state") not in TERMINAL_STATES:
        parts.append(f"{rate:.1f} img/s")
    if isinstance(eta, (int, float)) and job.get("state") not in TERMINAL_STATES:
        parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts) + f" ({job.get('state')})"


class ProgressPrinter:
    """One line redrawn in place on a terminal; otherwise a new line when the
    line changed, at most one per `log_every_s` (state changes and the last
    line always), so a CI log stays short."""

    def __init__(self, stream, is_tty: bool, log_every_s: float = PLAIN_LOG_EVERY_S, clock=time.monotonic):
        self.stream, self.is_tty, self.log_every_s, self.clock = stream, is_tty, log_every_s, clock
        self.last_line = ""
        self.last_state = None
        self.last_printed_at = None
        self.drawn_width = 0  # characters of the line now on the terminal

    def show(self, job: dict) -> None:
        line = progress_line(job)
        if line == self.last_line:
            return
        state = job.get("state")
        if self.is_tty:
            shown = line[:self.columns() - 1]  # a line that wraps could not be redrawn in place
            self.stream.write("\r" + shown.ljust(self.drawn_width))
            self.drawn_width = len(shown)
        else:
            now = self.clock()
            due = self.last_printed_at is None or now - self.last_printed_at >= self.log_every_s
            if not (due or state != self.last_state or state in TERMINAL_STATES):
                return
            self.stream.write(line + "\n")
            self.last_printed_at = now
        self.stream.flush()
        self.last_line, self.last_state = line, state

    def columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return 200

    def end_line(self) -> None:
        """Before any other message: move off the line being redrawn."""
        if self.is_tty and self.drawn_width:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn_width = 0
            self.last_line = ""

    def note(self, message: str) -> None:
        self.end_line()
        print(message, file=self.stream, flush=True)


def summary(job: dict) -> str:
    total = job.get("total")
    of_total = f" of {total} tasks" if isinstance(total, int) else ""
    took = ""
    if isinstance(job.get("finished_at"), (int, float)) and isinstance(job.get("created_at"), (int, float)):
        took = f" in {duration(job['finished_at'] - job['created_at'])}"
    return (f"job {job['id']} (project {job.get('project')}, model {job.get('model_version') or '?'}) "
            f"{job.get('state')}: {counts(job)}{of_total}; {number(job.get('written'))} predictions written{took}")


def print_result(job: dict) -> None:
    print(summary(job))
    failures = job.get("failures") if isinstance(job.get("failures"), list) else []
    for failure in failures[:MAX_FAILURES_SHOWN]:
        if isinstance(failure, dict):
            print(f"  task {failure.get('task')}: {failure.get('reason')}: {failure.get('message')}")
    unshown = number(job.get("failed")) - min(len(failures), MAX_FAILURES_SHOWN)
    if unshown > 0:
        print(f"  ... and {unshown} more failed tasks")
    if job.get("message"):
        print(job["message"])


def exit_status(job: dict) -> int:
    ok = job.get("state") == "done" and number(job.get("failed")) == 0
    return EXIT_OK if ok else EXIT_FAILED


# ---------------------------------------------------------------------- follow
def follow(client: JobsClient, job: dict, printer: ProgressPrinter, poll_s: float, give_up_s: float) -> dict:
    """Poll the job until it ends; the last job seen. Raises CliError after
    `give_up_s` without an answer, KeyboardInterrupt on Ctrl-C."""
    job_id = job["id"]
    path = "/jobs/" + urllib.parse.quote(job_id, safe="")
    printer.show(job)
    unreachable_since = None
    while job.get("state") not in TERMINAL_STATES:
        time.sleep(poll_s)
        try:
            job = job_of(client.call("GET", path))
        except Unreachable as exc:
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
                printer.note(f"the service does not answer ({exc}); retrying for up to {duration(give_up_s)}")
            if now - unreachable_since >= give_up_s:
                printer.end_line()
                raise CliError(f"gave up: the service at {client.base_url} has not answered for "
                               f"{duration(now - unreachable_since)}; job {job_id} may still be running there "
                               f"(follow it again: make annotate JOB={job_id})") from None
            continue
        except HTTPStatusError as exc:
            printer.end_line()
            if exc.status == 404:
                raise CliError(f"the service no longer knows job {job_id} (restarted?): "
                               f"{exc.error}; `make annotate LIST=1` shows its jobs") from None
            raise client.explain(exc) from None
        if unreachable_since is not None:
            unreachable_since = None
            printer.note("the service answers again")
        printer.show(job)
    printer.end_line()
    return job


def interrupted_message(job_id: str, cancelling: bool) -> str:
    if cancelling:
        return f"stopped following; the service goes on cancelling job {job_id}"
    return (f"stopped following; job {job_id} keeps running on the service. "
            f"Follow it again: make annotate JOB={job_id}; cancel it: make annotate CANCEL={job_id}")


def parse_tasks(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise CliError(f"--tasks expects task ids separated by commas (1,2,3), got {text!r}") from None
    if not ids or any(i <= 0 for i in ids):
        raise CliError(f"--tasks expects positive task ids separated by commas (1,2,3), got {text!r}")
    return list(dict.fromkeys(ids))  # once each, in the order given


def checked_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--url expects the service's http(s) URL, e.g. {DEFAULT_URL}; got {url!r}")
    if parts.username or parts.password:
        # Credentials in the URL would end up in shell history and in messages.
        raise CliError("--url must not carry credentials: set BASIC_AUTH_USER and BASIC_AUTH_PASS, or JOBS_TOKEN")
    return url.strip()


def list_jobs(client: JobsClient, project: int | None) -> int:
    jobs = client.call("GET", "/jobs").get("jobs")
    if not isinstance(jobs, list):
        raise CliError("the service's answer carries no job list")
    jobs = [j for j in jobs if isinstance(j, dict) and (project is None or j.get("project") == project)]
    if not jobs:
        print("no jobs" + (f" for project {project}" if project is not None else ""))
    for job in jobs:
        total = job.get("total")
        print(f"{job.get('id')}  {job.get('kind')}  project {job.get('project')}  {job.get('state')}  "
              f"{finished_tasks(job)}/{total if isinstance(total, int) else '?'} tasks, {counts(job)}")
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="annotate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=int, help="the Label Studio project to pre-annotate")
    parser.add_argument("--tasks", metavar="1,2,3", help="only these task ids (default: every task of the project)")
    parser.add_argument("--url", default=os.environ.get("MODEL_URL") or DEFAULT_URL,
                        help=f"the service (default: MODEL_URL, else {DEFAULT_URL})")
    parser.add_argument("--no-follow", action="store_true", help="start (or cancel) the job and return at once")
    parser.add_argument("--job", metavar="JOB_ID", help="follow this job instead of starting one")
    parser.add_argument("--cancel", metavar="JOB_ID", help="cancel this job (and follow it until it stops)")
    parser.add_argument("--list", action="store_true", help="list the service's jobs (of --project, if given)")
    parser.add_argument("--poll-s", type=float, default=1.0, help="seconds between polls (at least 0.2; default 1)")
    parser.add_argument("--give-up-s", type=float, default=GIVE_UP_S,
                        help="give up after the service has not answered this long (default %(default)g)")
    parser.add_argument("--log-every-s", type=float, default=PLAIN_LOG_EVERY_S,
                        help="without a terminal, at most one progress line per this many seconds "
                             "(default %(default)g)")
    opts = parser.parse_args(argv)
    actions = [name for name, given in (("--job", opts.job), ("--cancel", opts.cancel), ("--list", opts.list)) if given]
    if len(actions) > 1:
        parser.error(f"{' and '.join(actions)} do not go together")
    if not actions and opts.project is None:
        parser.error("say which project: --project ID (or --job, --cancel, --list)")
    if opts.tasks and (actions or opts.project is None):
        parser.error("--tasks goes with --project, when starting a job")
    if opts.poll_s != opts.poll_s or opts.poll_s < MIN_POLL_S:  # NaN too
        parser.error(f"--poll-s must be at least {MIN_POLL_S}")
    if not opts.give_up_s >= 0 or not opts.log_every_s >= 0:
        parser.error("--give-up-s and --log-every-s must be 0 or more")
    return opts


def run(opts: argparse.Namespace) -> int:
    authorization, credentials_from = auth_header()
    client = JobsClient(checked_url(opts.url), authorization, credentials_from)
    printer = ProgressPrinter(sys.stderr, sys.stderr.isatty(), opts.log_every_s)
    try:
        if opts.list:
            return list_jobs(client, opts.project)
        if opts.cancel:
            job = job_of(client.call("DELETE", "/jobs/" + urllib.parse.quote(opts.cancel, safe="")))
            printer.note(f"job {job['id']} (project {job.get('project')}): {job.get('state')}")
        elif opts.job:
            job = job_of(client.call("GET", "/jobs/" + urllib.parse.quote(opts.job, safe="")))
        else:
            body: dict = {"project": opts.project}
            if opts.tasks:
                body["task_ids"] = parse_tasks(opts.tasks)
            try:
                job = job_of(client.call("POST", "/jobs", body))
                printer.note(f"started job {job['id']} for project {opts.project}")
            except HTTPStatusError as exc:
                if exc.status != 409 or not isinstance(exc.body, dict) or not isinstance(exc.body.get("job"), dict):
                    raise
                job = job_of(exc.body)
                printer.note(f"project {opts.project} already has job {job['id']} running ({exc.error}): "
                             "following it instead")
    except Unreachable as exc:
        # Nothing to follow yet: say so at once rather than wait for a service that may never come.
        raise CliError(f"cannot reach the service at {client.base_url} ({exc}): is it running (make serve)? "
                       "Another address: --url or MODEL_URL") from None
    except HTTPStatusError as exc:
        raise client.explain(exc) from None
    except KeyboardInterrupt:
        print("\ninterrupted; `make annotate LIST=1` shows whether a job was started", file=sys.stderr)
        return EXIT_INTERRUPTED

    if opts.no_follow:
        print(f"job {job['id']}: {job.get('state')} (follow it: make annotate JOB={job['id']}; "
              f"cancel it: make annotate CANCEL={job['id']})")
        return EXIT_OK
    try:
        job = follow(client, job, printer, opts.poll_s, opts.give_up_s)
    except CliError:
        printer.end_line()
        raise
    except KeyboardInterrupt:
        printer.end_line()
        print(interrupted_message(job["id"], bool(opts.cancel)), file=sys.stderr)
        return EXIT_INTERRUPTED
    print_result(job)
    if opts.cancel and job.get("state") == "cancelled":
        return EXIT_OK  # what was asked for
    return exit_status(job)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return run(opts)
    except CliError as exc:
        print(f"annotate: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
