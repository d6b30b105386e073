"""Test harness: a real, headless Label Studio 1.23 for end-to-end tests.

Label Studio lives in its own virtualenv (see scripts/install_labelstudio.sh);
this module only needs the standard library and ``requests`` and talks to
Label Studio over HTTP. Each ``LabelStudioServer`` gets a fresh data dir
seeded from a cached, already-migrated SQLite template, so a start takes a few
seconds instead of ~40 s of migrations.

Typical use::

    with LabelStudioServer() as ls:
        p = ls.client.create_project(LABEL_CONFIG)
        ls.client.import_files(p["id"], [png_path])
        ls.client.add_ml_backend(p["id"], "http://127.0.0.1:9090")
        ls.client.retrieve_predictions(p["id"])
        preds = ls.client.predictions(task_id)

See docs/labelstudio-notes.md for what Label Studio does on the wire.
"""
from __future__ import annotations

import atexit
import glob
import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

LS_SERIES = "1.23"
REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_labelstudio.sh"

DEFAULT_USERNAME = "admin@example.com"
DEFAULT_PASSWORD = "ls-test-password-1"
# Legacy token ("Authorization: Token ..."); Label Studio accepts any string > 5 chars.
DEFAULT_LEGACY_TOKEN = "mmdet-ls-test-token-0123456789"

# Environment every harness-started Label Studio gets (offline, local ML
# backends allowed, strict prediction validation on).
BASE_ENV = {
    "COLLECT_ANALYTICS": "false",
    "LATEST_VERSION_CHECK": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "SSRF_PROTECTION_ENABLED": "false",
    "ML_BLOCK_LOCAL_IP": "false",
    "fflag_feat_utc_210_prediction_validation_15082025": "true",
}


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed/started, or an API call failed."""


# --------------------------------------------------------------------------
# installation / template lookup
# --------------------------------------------------------------------------

def default_venv() -> Path:
    """Path of the Label Studio venv (``$LABEL_STUDIO_VENV`` or the cache default)."""
    env = os.environ.get("LABEL_STUDIO_VENV")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mmdet-ls-backend" / f"labelstudio-{LS_SERIES}-venv"


def installed_version(venv: Path | None = None) -> str | None:
    """Installed label-studio version in ``venv`` (read from dist-info, no subprocess)."""
    venv = Path(venv or default_venv())
    hits = glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "label_studio-*.dist-info"))
    if not hits or not (venv / "bin" / "label-studio").exists():
        return None
    return Path(sorted(hits)[-1]).name[len("label_studio-"):-len(".dist-info")]


def template_db(venv: Path | None = None, version: str | None = None) -> Path:
    """Where install_labelstudio.sh keeps the migrated template DB for ``version``."""
    venv = Path(venv or default_venv())
    version = version or installed_version(venv) or "unknown"
    return venv / "mmdet-ls-template" / version / "label_studio.sqlite3"


def ensure_installed(venv: Path | None = None, auto_install: bool | None = None) -> tuple[Path, str, Path]:
    """Return ``(venv, version, template_db)``; run the install script if something is missing.

    ``auto_install`` defaults to ``$LABEL_STUDIO_AUTO_INSTALL`` (on unless "0").
    """
    venv = Path(venv or default_venv())
    version = installed_version(venv)
    ok = version is not None and version.startswith(LS_SERIES + ".") and template_db(venv, version).is_file()
    if not ok:
        if auto_install is None:
            auto_install = os.environ.get("LABEL_STUDIO_AUTO_INSTALL", "1") != "0"
        if not auto_install:
            raise LabelStudioError(
                f"Label Studio {LS_SERIES} or its template DB is missing in {venv}; "
                f"run {INSTALL_SCRIPT}")
        print(f"[labelstudio] running {INSTALL_SCRIPT} (venv {venv})", file=sys.stderr, flush=True)
        env = dict(os.environ, LABEL_STUDIO_VENV=str(venv))
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabelStudioError(f"{INSTALL_SCRIPT} failed:\n{proc.stdout}\n{proc.stderr}")
        version = installed_version(venv)
        if version is None or not template_db(venv, version).is_file():
            raise LabelStudioError(f"{INSTALL_SCRIPT} ran but left no usable install:\n{proc.stdout}")
    return venv, version, template_db(venv, version)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _minimal_env() -> dict[str, str]:
    # Label Studio reads MANY bare names (HOST, PORT, USERNAME, PASSWORD, DEBUG,
    # DATABASE_NAME, ...) and every LABEL_STUDIO_*/HEARTEX_* variable, and its
    # requests to the ML backend honour http(s)_proxy. Start from a clean slate.
    env = {}
    for key in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("LANG", "C.UTF-8")
    return env


# --------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------

class LabelStudioClient:
    """Small ``requests`` client for the Label Studio REST API.

    Authenticate with a legacy token (``token=..., scheme="Token"``), an access
    token (``scheme="Bearer"``) or a personal access token (``pat=...``; it is
    exchanged for a Bearer access token and refreshed on 401, access tokens
    live 5 minutes).
    """

    def __init__(self, url: str, token: str | None = None, scheme: str = "Token",
                 pat: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.pat = pat
        self.session = requests.Session()
        self.session.trust_env = False  # never route 127.0.0.1 through a proxy
        self._auth: str | None = None
        if pat:
            self._auth = "Bearer " + self.exchange_pat(pat)
        elif token:
            self._auth = f"{scheme} {token}"

    # -- plumbing ----------------------------------------------------------
    def request(self, method: str, path: str, expect: Iterable[int] | None = (200, 201, 204),
                **kwargs: Any) -> requests.Response:
        """Send a request to ``url + path``; raise LabelStudioError unless the status is in ``expect``."""
        kwargs.setdefault("timeout", self.timeout)
        headers = dict(kwargs.pop("headers", None) or {})
        explicit_auth = "Authorization" in headers
        if self._auth and not explicit_auth:
            headers["Authorization"] = self._auth
        full = path if path.startswith("http") else self.url + path
        resp = self.session.request(method, full, headers=headers, **kwargs)
        if resp.status_code == 401 and self.pat and not explicit_auth:
            self._auth = "Bearer " + self.exchange_pat(self.pat)
            headers["Authorization"] = self._auth
            resp = self.session.request(method, full, headers=headers, **kwargs)
        if expect is not None and resp.status_code not in tuple(expect):
            raise LabelStudioError(f"{method} {path} -> HTTP {resp.status_code}: {resp.text[:2000]}")
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        return resp.json() if resp.content else None

    def get(self, path: str, **kw: Any) -> Any:
        """GET and decode JSON."""
        return self._json("GET", path, **kw)

    def post(self, path: str, json_body: Any = None, **kw: Any) -> Any:
        """POST JSON and decode JSON."""
        return self._json("POST", path, json=json_body, **kw)

    def patch(self, path: str, json_body: Any = None, **kw: Any) -> Any:
        """PATCH JSON and decode JSON."""
        return self._json("PATCH", path, json=json_body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        """DELETE and decode JSON (if any)."""
        return self._json("DELETE", path, **kw)

    # -- auth / tokens -----------------------------------------------------
    def exchange_pat(self, pat: str) -> str:
        """``POST /api/token/refresh/ {"refresh": PAT}`` -> short-lived (5 min) access token."""
        resp = self.session.post(self.url + "/api/token/refresh/", json={"refresh": pat}, timeout=self.timeout)
        if resp.status_code != 200:
            raise LabelStudioError(f"PAT exchange failed: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()["access"]

    def whoami(self) -> dict:
        """``GET /api/current-user/whoami``."""
        return self.get("/api/current-user/whoami")

    def legacy_token(self) -> str:
        """The user's legacy API token (``GET /api/current-user/token``)."""
        return self.get("/api/current-user/token")["token"]

    def create_personal_access_token(self) -> str:
        """``POST /api/token/`` -> full PAT (JWT refresh token). Only one live PAT per user (409 otherwise)."""
        return self.post("/api/token/")["token"]

    def rotate_personal_access_token(self, pat: str) -> str:
        """``POST /api/token/rotate/`` -> new PAT; the old one is blacklisted."""
        return self.post("/api/token/rotate/", {"refresh": pat})["refresh"]

    def jwt_settings(self) -> dict:
        """``GET /api/jwt/settings`` -> {"api_tokens_enabled", "legacy_api_tokens_enabled"} of the org."""
        return self.get("/api/jwt/settings")

    def set_jwt_settings(self, **fields: Any) -> dict:
        """``POST /api/jwt/settings``, e.g. ``legacy_api_tokens_enabled=False`` (org-wide switch)."""
        cur = self.jwt_settings()
        cur.update(fields)
        return self.post("/api/jwt/settings", cur)

    # -- projects & tasks ---------------------------------------------------
    def create_project(self, label_config: str, title: str | None = None, **fields: Any) -> dict:
        """``POST /api/projects`` with a label config; returns the project dict (``id`` etc.)."""
        body = {"title": title or f"test-{int(time.time() * 1000) % 10**9}", "label_config": label_config}
        body.update(fields)
        return self.post("/api/projects", body)

    def get_project(self, project_id: int) -> dict:
        """``GET /api/projects/ID``."""
        return self.get(f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict:
        """``PATCH /api/projects/ID``."""
        return self.patch(f"/api/projects/{project_id}", fields)

    def import_files(self, project_id: int,
                     files: Sequence[str | os.PathLike | tuple[str, bytes]]) -> dict:
        """Upload image/other files like the UI does (``POST /api/projects/ID/import`` multipart).

        ``files``: paths or ``(filename, bytes)``. Each file becomes one task whose
        data value is ``/data/upload/<project>/<8 hex>-<filename>``. Returns the
        import response with ``task_ids``.
        """
        parts = []
        opened = []
        try:
            for i, f in enumerate(files):
                if isinstance(f, tuple):
                    name, content = f
                else:
                    name = Path(f).name
                    fh = open(f, "rb")
                    opened.append(fh)
                    content = fh
                ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
                parts.append((f"file{i}", (name, content, ctype)))
            return self._json("POST", f"/api/projects/{project_id}/import?return_task_ids=true", files=parts)
        finally:
            for fh in opened:
                fh.close()

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> dict:
        """Import JSON tasks (``POST /api/projects/ID/import``).

        Each item is either ``{"data": {...}, ...}`` or a bare data dict such as
        ``{"image": "http://127.0.0.1:PORT/x.png"}``. Returns the response with ``task_ids``.
        """
        return self.post(f"/api/projects/{project_id}/import?return_task_ids=true", list(tasks))

    def list_tasks(self, project_id: int, fields: str = "all") -> list[dict]:
        """All tasks of a project with predictions (``GET /api/tasks?project=ID&fields=all``)."""
        out, page = [], 1
        while True:
            resp = self.request("GET", "/api/tasks", params={"project": project_id, "fields": fields,
                                                              "page": page, "page_size": 100},
                                expect=(200, 404))
            if resp.status_code == 404:  # past the last page
                break
            body = resp.json()
            items = body["tasks"] if isinstance(body, dict) else body
            out.extend(items)
            total = body.get("total") if isinstance(body, dict) else None
            if not items or total is None or len(out) >= total:
                break
            page += 1
        return out

    def get_task(self, task_id: int) -> dict:
        """Open a task like the labeling UI (``GET /api/tasks/ID``).

        If the project shows predictions (default) and the task has NO prediction
        at all, Label Studio synchronously asks the ML backend for this single task.
        """
        return self.get(f"/api/tasks/{task_id}")

    # -- ML backend ----------------------------------------------------------
    def add_ml_backend(self, project_id: int, url: str, title: str | None = None, **fields: Any) -> dict:
        """Connect an ML backend (``POST /api/ml``). Label Studio calls /health and /setup
        (twice each) before answering; a failing /health or /setup -> HTTP 400."""
        body = {"url": url, "project": project_id, "title": title or "mmdet"}
        body.update(fields)
        return self.post("/api/ml", body)

    def list_ml_backends(self, project_id: int) -> list[dict]:
        """``GET /api/ml?project=ID`` (calls /health + /setup of every backend)."""
        return self.get("/api/ml", params={"project": project_id})

    def get_ml_backend(self, ml_id: int) -> dict:
        """``GET /api/ml/ID`` (calls /health + /setup, refreshes state/model_version)."""
        return self.get(f"/api/ml/{ml_id}")

    def update_ml_backend(self, ml_id: int, **fields: Any) -> dict:
        """``PATCH /api/ml/ID``."""
        return self.patch(f"/api/ml/{ml_id}", fields)

    def delete_ml_backend(self, ml_id: int) -> None:
        """``DELETE /api/ml/ID``."""
        self.request("DELETE", f"/api/ml/{ml_id}")

    # -- data manager actions -----------------------------------------------
    def action(self, action_id: str, project_id: int, task_ids: Sequence[int] | None = None,
               expect: Iterable[int] | None = (200,)) -> requests.Response:
        """Run a Data Manager action on all tasks (``task_ids=None``) or the given ones."""
        if task_ids is None:
            selected = {"all": True, "excluded": []}
        else:
            selected = {"all": False, "included": list(task_ids)}
        return self.request("POST", "/api/dm/actions", params={"id": action_id, "project": project_id},
                            json={"selectedItems": selected}, expect=expect)

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None,
                             expect: Iterable[int] | None = (200,)) -> requests.Response:
        """The "Retrieve Predictions" action: ONE synchronous /predict call with all selected
        tasks that have no prediction of the current model_version. Returns the raw response
        (200 ``{"processed_items": N, ...}``; 400 if Label Studio rejected a prediction)."""
        return self.action("retrieve_tasks_predictions", project_id, task_ids, expect=expect)

    def delete_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> requests.Response:
        """The "Delete Predictions" action."""
        return self.action("delete_tasks_predictions", project_id, task_ids)

    def predictions(self, task_id: int) -> list[dict]:
        """Stored predictions of a task (``GET /api/predictions?task=ID``)."""
        return self.get("/api/predictions", params={"task": task_id})

    def download(self, path_or_url: str) -> bytes:
        """Fetch e.g. ``/data/upload/1/ab12cd34-x.png`` with this client's auth."""
        return self.request("GET", path_or_url).content


# --------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------

_LIVE: set[LabelStudioServer] = set()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:
            pass


class LabelStudioServer:
    """A headless Label Studio on 127.0.0.1 with a fresh SQLite data dir.

    Use as a context manager (or ``start()``/``stop()``). After start:

    * ``url`` / ``port`` / ``hostname`` (what LS sends as ``hostname`` in /setup)
    * ``data_dir`` (LABEL_STUDIO_BASE_DATA_DIR); uploads land in
      ``data_dir/media/upload/<project>/<8 hex>-<name>`` (see ``upload_path``)
    * ``username`` / ``password``
    * ``legacy_token`` (``Authorization: Token ...``; enabled for the org unless
      ``enable_legacy_api_token=False``), ``pat`` (personal access token, a JWT
      refresh token), ``access_token`` (PAT exchanged at /api/token/refresh/,
      valid 5 minutes)
    * ``client`` (legacy-token client when enabled, else PAT client),
      ``pat_client`` (Bearer, auto-refreshing)
    * ``log_path`` / ``log_text()``: Label Studio's stdout+stderr
    """

    def __init__(self, *, venv: str | os.PathLike | None = None, port: int | None = None,
                 base_dir: str | os.PathLike | None = None, keep_data: bool | None = None,
                 username: str = DEFAULT_USERNAME, password: str = DEFAULT_PASSWORD,
                 legacy_token: str = DEFAULT_LEGACY_TOKEN, enable_legacy_api_token: bool = True,
                 create_pat: bool = True, hostname: str | None = None,
                 env: Mapping[str, str] | None = None, log_level: str = "INFO",
                 startup_timeout: float = 120.0, nice: int | None = 10):
        self.venv = Path(venv) if venv else default_venv()
        self._port = port
        self._base_dir_arg = Path(base_dir) if base_dir else None
        self.keep_data = (os.environ.get("LABEL_STUDIO_KEEP_DATA") == "1") if keep_data is None else keep_data
        self.username = username
        self.password = password
        self.legacy_token = legacy_token
        self.enable_legacy_api_token = enable_legacy_api_token
        self.create_pat = create_pat
        self._hostname_arg = hostname
        self.extra_env = dict(env or {})
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.nice = nice

        self.version: str | None = None
        self.proc: subprocess.Popen | None = None
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self.port: int | None = None
        self.url: str | None = None
        self.hostname: str | None = None
        self.pat: str | None = None
        self.access_token: str | None = None
        self.client: LabelStudioClient | None = None
        self.pat_client: LabelStudioClient | None = None
        self.startup_seconds: float | None = None
        self._log_fh = None
        self._owns_base_dir = False

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LabelStudioServer:
        """Copy the template DB into a fresh data dir, start Label Studio, wait until it
        answers /health, then set up tokens and clients. Returns ``self``."""
        if self.proc is not None:
            raise LabelStudioError("already started")
        t0 = time.monotonic()
        self.venv, self.version, template = ensure_installed(self.venv)

        if self._base_dir_arg is not None:
            self.base_dir = self._base_dir_arg
            self.base_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.base_dir = Path(tempfile.mkdtemp(prefix="labelstudio-"))
            self._owns_base_dir = True
        self.data_dir = self.base_dir / "data"
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        shutil.copyfile(template, self.data_dir / "label_studio.sqlite3")
        self.log_path = self.base_dir / "labelstudio.log"

        self.port = self._port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hostname = (self._hostname_arg or self.url).rstrip("/")

        env = _minimal_env()
        env.update(BASE_ENV)
        env["LABEL_STUDIO_BASE_DATA_DIR"] = str(self.data_dir)
        env.update(self.extra_env)
        cmd = [str(self.venv / "bin" / "label-studio"), "start", "--no-browser",
               "--internal-host", "127.0.0.1", "--port", str(self.port),
               "--host", self.hostname, "--log-level", self.log_level,
               "--username", self.username, "--password", self.password,
               "--user-token", self.legacy_token]
        # Legacy-token auth is decided when the organization is created, i.e. at this
        # first start (the template DB has no users/orgs). We always create the org
        # with it ON (the harness authenticates with it to mint the PAT) and switch it
        # off afterwards through /api/jwt/settings if asked to.
        cmd.append("--enable-legacy-api-token")
        if self.nice:
            cmd = ["nice", "-n", str(self.nice)] + cmd

        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(self.base_dir), stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        try:
            self._wait_up(t0)
            self._setup_auth()
        except BaseException:
            self.stop(keep_data=True)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_up(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        sess = requests.Session()
        sess.trust_env = False
        while True:
            if self.proc.poll() is not None:
                raise LabelStudioError(
                    f"Label Studio exited with {self.proc.returncode} during start-up; log {self.log_path}:\n"
                    + self.log_text()[-4000:])
            log = self.log_text()
            m = re.search(r"Starting development server at http://[^:]+:(\d+)/", log)
            if m and int(m.group(1)) != self.port:
                # label-studio silently moves to the next port if ours got taken.
                raise LabelStudioError(f"port {self.port} was taken; Label Studio moved to {m.group(1)}")
            try:
                if sess.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"Label Studio not up after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
                    + self.log_text()[-4000:])
            time.sleep(0.2)

    def _setup_auth(self) -> None:
        legacy = LabelStudioClient(self.url, token=self.legacy_token, scheme="Token")
        me = legacy.whoami()
        if me.get("email") != self.username:
            raise LabelStudioError(f"unexpected user {me.get('email')!r}")
        if self.create_pat:
            self.pat = legacy.create_personal_access_token()
            self.pat_client = LabelStudioClient(self.url, pat=self.pat)
            self.access_token = self.pat_client._auth.split(" ", 1)[1]
        if self.enable_legacy_api_token:
            self.client = legacy
        else:
            if not self.create_pat:
                raise LabelStudioError("enable_legacy_api_token=False needs create_pat=True")
            self.pat_client.set_jwt_settings(legacy_api_tokens_enabled=False)
            self.client = self.pat_client

    def stop(self, keep_data: bool | None = None) -> None:
        """Stop Label Studio (SIGTERM to its process group, SIGKILL after 10 s) and
        remove the temp data dir unless ``keep_data``/``LABEL_STUDIO_KEEP_DATA=1``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
            # Reap anything left in the group (runserver has no children, but be sure).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        _LIVE.discard(self)
        keep = self.keep_data if keep_data is None else keep_data
        if self._owns_base_dir and not keep and self.base_dir is not None and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)
        elif keep and self.base_dir is not None:
            print(f"[labelstudio] kept data dir {self.base_dir}", file=sys.stderr)

    @property
    def running(self) -> bool:
        """True while the Label Studio process is alive."""
        return self.proc is not None and self.proc.poll() is None

    # -- helpers -------------------------------------------------------------
    def log_text(self) -> str:
        """Everything Label Studio printed so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def upload_path(self, data_url: str) -> Path:
        """Map a task value ``/data/upload/<project>/<file>`` to the file on disk
        (``<data_dir>/media/upload/<project>/<file>``)."""
        path = data_url
        if path.startswith(self.hostname):
            path = path[len(self.hostname):]
        prefix = "/data/"
        if not path.startswith(prefix):
            raise ValueError(f"not a Label Studio upload URL: {data_url}")
        return self.data_dir / "media" / path[len(prefix):]

    def create_user(self, email: str, password: str, legacy_token: str | None = None) -> dict:
        """Add another user to the organization via ``label-studio init`` on the same DB
        (takes a few seconds); returns ``{"email", "password", "legacy_token", "client"}``."""
        token = legacy_token or ("tok-" + os.urandom(12).hex())
        env = _minimal_env()
        env.update(BASE_ENV)
        env["LABEL_STUDIO_BASE_DATA_DIR"] = str(self.data_dir)
        env["LOG_LEVEL"] = "WARNING"
        proc = subprocess.run([str(self.venv / "bin" / "label-studio"), "init", "--quiet",
                               "--username", email, "--password", password, "--user-token", token],
                              env=env, cwd=str(self.base_dir), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise LabelStudioError(f"label-studio init failed:\n{proc.stdout}\n{proc.stderr}")
        client = LabelStudioClient(self.url, token=token)
        return {"email": email, "password": password, "legacy_token": token, "client": client}


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/labelstudio_server.py [--keep]``: start LS, print URL/tokens, wait for Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    args = ap.parse_args(argv)
    with LabelStudioServer(port=args.port, keep_data=args.keep) as ls:
        print(json.dumps({"url": ls.url, "data_dir": str(ls.data_dir), "username": ls.username,
                          "password": ls.password, "legacy_token": ls.legacy_token, "pat": ls.pat,
                          "startup_seconds": round(ls.startup_seconds, 2), "log": str(ls.log_path)},
                         indent=2), flush=True)
        try:
            while ls.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
