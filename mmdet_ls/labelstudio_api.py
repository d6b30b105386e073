"""Label Studio's REST API, as background pre-annotation jobs use it.

Pure (no Ray). Every request goes through the pinned client
(`mmdet_ls.http_fetch.request`) to the operator's own Label Studio
(`trusted_host=True`), with the key from `LabelStudioAuth`; every URL is built
by `LabelStudioAccess.url_for`, so the key goes to that origin only. Redirects
are not followed (a 3xx is an error), every answer is read with a byte cap.

What Label Studio 1.23 offers, and what this module does about it (details
and file:line references: docs/labelstudio-notes.md, "Bulk prediction API"):

* Task pages come from `GET /api/tasks/` (the Data Manager list) with a JSON
  `query` of filters, ordering and selected ids. Pages are keyset pages
  (filter `id > after_id`, order by id, always page 1): the set of pending
  tasks shrinks while a job writes, and page numbers would skip tasks.
* Label Studio has no exact model-version filter. `predictions_model_versions`
  `contains` / `not_contains` match substrings (case-insensitively on SQLite),
  so `not_contains ["v1"]` also hides tasks that only hold "v12" or "V1".
  Versions that contain ours ("confusable" ones) are listed first
  (`GET /api/projects/ID/model-versions/`). Without any, the filter is exact.
  With some, the tasks holding one of them are read as a second stream with
  their version list and checked on this side, exactly; the few whose list is
  too long or ambiguous to read are checked one by one (/api/predictions).
* Listing runs with `review=true` where the tasks may hold no prediction at all:
  otherwise a project with "evaluate predictions automatically" on makes
  Label Studio call the ML backend (us) for them inside our own request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from .failures import TaskError
from .http_fetch import FetchLimits, request
from .image_sources import LabelStudioAccess, LabelStudioAuth
from .network_policy import NetworkPolicy

__all__ = ["LabelStudioAPI", "LabelStudioAPIError"]

TASK_PAGE_MAX_BYTES = 16 * 1024 * 1024  # a page of tasks with their data
SMALL_MAX_BYTES = 1024 * 1024  # a project, an import answer
VERSIONS_MAX_BYTES = 4 * 1024 * 1024  # every model version of a project with its count
ERROR_BODY_MAX_BYTES = 64 * 1024  # read of an error answer; what is quoted is shorter still
ERROR_TEXT_CHARS = 500
MAX_IMPORT_BODY_BYTES = 64 * 1024 * 1024  # Label Studio takes up to 250 MB; a job writes far less at once
MAX_PAGE_SIZE = 1000
SCAN_PAGE_SIZE = 1000  # ids and version lists only: small rows
# Task ids in one query string: the URL stays under ~4 KB (proxies in front
# of Label Studio often refuse request lines over 8 KB).
IDS_PER_QUERY = 200
# The Data Manager cuts a task's version list at 500 characters
# (DataManagerTaskSerializer.CHAR_LIMITS); shorter than this it is whole.
WHOLE_VERSION_LIST_CHARS = 300
# Characters that make a version list ambiguous once Label Studio joined it
# with "," (and, on PostgreSQL, JSON-quoted it and dropped the quotes).
AMBIGUOUS_VERSION_CHARS = frozenset(',"\\[]')

# Label Studio's API answers are computed synchronously, and an import
# recounts every task of the project: give it longer than an image download.
DEFAULT_API_LIMITS = FetchLimits(connect_timeout_s=5.0, read_timeout_s=60.0, total_timeout_s=120.0, max_redirects=0)

_TASK_ID = "filter:tasks:id"
_MODEL_VERSIONS = "filter:tasks:predictions_model_versions"


class LabelStudioAPIError(Exception):
    """A Label Studio API call failed. The message names the endpoint (path
    only) and the HTTP status, never the key; `retriable` says whether the
    same call may succeed later (5xx, 429, timeouts, broken connections)."""

    def __init__(self, message: str, status: int | None = None, retriable: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retriable = retriable


class _TooLarge(LabelStudioAPIError):
    """An answer over its byte cap (a page of tasks with big data: ask for fewer)."""


@dataclass
class _Page:
    tasks: list[dict]
    total: int

    @property
    def more(self) -> bool:
        """Whether tasks past the last one on this page match too."""
        return self.total > len(self.tasks)


def _check_id(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}"[:200])
    return value


def _check_version(model_version) -> str:
    if not isinstance(model_version, str) or not model_version:
        raise ValueError("model_version must be a non-empty string")
    return model_version


def _unique_ids(task_ids) -> list[int]:
    return sorted({_check_id(t, "a task id") for t in task_ids})


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _id_after(after_id: int) -> dict:
    return {"filter": _TASK_ID, "operator": "greater", "type": "Number", "value": after_id}


def _versions_filter(operator: str, versions: list[str]) -> dict:
    # The value must be a list: Label Studio iterates it (a string would be
    # read character by character, data_manager/managers.py:345-355).
    return {"filter": _MODEL_VERSIONS, "operator": operator, "type": "List", "value": list(versions)}


def _ambiguous(version: str) -> bool:
    return (version != version.strip() or any(c in AMBIGUOUS_VERSION_CHARS for c in version)
            or any(ord(c) < 0x20 for c in version))


def _error_text(raw: bytes, secrets: tuple[str, ...]) -> str:
    """Label Studio's error answer, short and on one line: `detail` and
    `validation_errors` of its JSON, else the text."""
    text = raw.decode("utf-8", "replace")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        parts = [str(answer.get("detail", ""))] if answer.get("detail") else []
        if answer.get("validation_errors") is not None:
            parts.append(json.dumps(answer["validation_errors"], ensure_ascii=False))
        text = ": ".join(parts) or text
    text = " ".join(text.split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= ERROR_TEXT_CHARS else text[:ERROR_TEXT_CHARS] + "..."


class LabelStudioAPI:
    """Client for the calls a pre-annotation job makes. Thread-safe (no
    shared state besides the auth's token, which holds its own lock)."""

    def __init__(self, access: LabelStudioAccess, limits: FetchLimits | None = None,
                 policy: NetworkPolicy | None = None):
        if not access.api_key:
            raise ValueError("the Label Studio API needs a key (LABEL_STUDIO_API_KEY)")
        self.access = access
        self.limits = limits or DEFAULT_API_LIMITS
        # Label Studio's own host is trusted (it may be on a private address,
        # as the image loader allows); metadata addresses stay closed.
        self.policy = policy or NetworkPolicy()
        self.auth = LabelStudioAuth(access, self.limits, self.policy)

    def __repr__(self):  # never show the key
        return f"LabelStudioAPI({self.access.base.redacted()!r})"

    # ------------------------------------------------------------- endpoints
    def project(self, project_id: int) -> dict:
        """{"id", "title", "label_config"} of a project (counts left out)."""
        _check_id(project_id, "project_id")
        answer = self._json("GET", f"/api/projects/{project_id}/", {"include": "id,title,label_config"})
        if not isinstance(answer, dict) or not isinstance(answer.get("label_config"), str):
            raise LabelStudioAPIError(f"GET /api/projects/{project_id}/: the answer is not a project")
        return {"id": answer.get("id", project_id), "title": answer.get("title") or "",
                "label_config": answer["label_config"]}

    def pending_tasks(self, project_id: int, model_version: str, *, after_id: int = 0, page_size: int = 100,
                      task_ids: list[int] | None = None) -> list[dict]:
        """Tasks of the project with id > after_id (only those of `task_ids`,
        if given) that hold no prediction of exactly `model_version`, in id
        order, at most `page_size`: [{"id", "data"}]. The data is raw, as
        /predict gets it (storage URLs not resolved).

        Only an empty list means "no more": a page can be shorter than
        page_size. Continue with after_id = the last id returned.
        """
        _check_id(project_id, "project_id")
        _check_version(model_version)
        cursor = _check_id(after_id, "after_id")
        page_size = max(1, min(int(page_size), MAX_PAGE_SIZE))
        wanted = _unique_ids(task_ids) if task_ids is not None else None
        confusable, readable = self._confusable_versions(project_id, model_version)
        while True:
            chunk = None
            if wanted is not None:
                chunk = [t for t in wanted if t > cursor][:IDS_PER_QUERY]
                if not chunk:
                    return []
            try:
                found, scanned_to, complete = self._pending_page(project_id, model_version, cursor, page_size,
                                                                 chunk, confusable, readable)
            except _TooLarge:
                if page_size == 1:
                    raise
                page_size //= 2  # tasks with big data: fewer per page
                continue
            if found:
                return found
            if complete:
                if chunk is None or len(chunk) < IDS_PER_QUERY:
                    return []
                scanned_to = chunk[-1]
            cursor = scanned_to

    def count_pending(self, project_id: int, model_version: str, task_ids: list[int] | None = None) -> int:
        """How many tasks pending_tasks would yield from after_id=0. One list
        call (per 200 task ids) plus the project's model-version list; a scan
        of the confusable tasks' version lists only when there are any."""
        _check_id(project_id, "project_id")
        _check_version(model_version)
        chunks: list[list[int] | None] = [None]
        if task_ids is not None:
            wanted = _unique_ids(task_ids)
            if not wanted:
                return 0
            chunks = _chunks(wanted, IDS_PER_QUERY)
        confusable, readable = self._confusable_versions(project_id, model_version)
        total = 0
        for chunk in chunks:
            page = self._task_page(project_id, [_versions_filter("not_contains", [model_version])],
                                   page_size=1, include="id", ids=chunk, may_lack_predictions=True)
            total += page.total
            if confusable:
                total += self._count_confusable_pending(project_id, model_version, chunk, confusable, readable)
        return total

    def tasks_with_prediction(self, project_id: int, task_ids: list[int], model_version: str) -> set[int]:
        """Which of task_ids hold a prediction of exactly `model_version` now
        (one list call per 200 ids, plus the project's model-version list)."""
        _check_id(project_id, "project_id")
        _check_version(model_version)
        wanted = _unique_ids(task_ids)
        if not wanted:
            return set()
        confusable, readable = self._confusable_versions(project_id, model_version)
        held: set[int] = set()
        for chunk in _chunks(wanted, IDS_PER_QUERY):
            page = self._task_page(project_id, [_versions_filter("contains", [model_version])], page_size=len(chunk),
                                   include="id,predictions_model_versions", ids=chunk)
            for task in page.tasks:
                holds = self._holds_from_list(task, model_version, readable)
                if holds is None:
                    # Without confusable versions, Label Studio's substring match is exact.
                    holds = True if not confusable else self._holds_by_lookup(task["id"], model_version)
                if holds:
                    held.add(task["id"])
        return held

    def import_predictions(self, project_id: int, items: list[dict]) -> int:
        """POST /api/projects/ID/import/predictions with [{"task", "result",
        "score", "model_version"}]; returns how many Label Studio created.

        With strict validation on (fflag_feat_utc_210_..., our harness) one
        invalid item rejects the whole call: HTTP 400, nothing stored. With it
        off (Label Studio's default) invalid results are dropped silently and
        the rest stored: compare the count with len(items). Not idempotent: after
        a timeout, check with tasks_with_prediction before writing again.
        """
        _check_id(project_id, "project_id")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ValueError("items must be a list of prediction dicts")
        if not items:
            return 0  # an empty import still recounts every task of the project
        body = json.dumps(items, ensure_ascii=False, allow_nan=False).encode()
        if len(body) > MAX_IMPORT_BODY_BYTES:
            raise ValueError(f"{len(body)} bytes of predictions in one import; at most {MAX_IMPORT_BODY_BYTES}: "
                             "write fewer at once")
        path = f"/api/projects/{project_id}/import/predictions"
        answer = self._json("POST", path, body=body, expect=201)
        created = answer.get("created") if isinstance(answer, dict) else None
        if isinstance(created, bool) or not isinstance(created, int):
            raise LabelStudioAPIError(f"POST {path}: the answer has no created count", status=201)
        return created

    # ------------------------------------------------------------- pending
    def _pending_page(self, project_id: int, model_version: str, cursor: int, page_size: int,
                      ids: list[int] | None, confusable: list[str], readable: bool) -> tuple[list[dict], int, bool]:
        """Pending tasks after `cursor`: (tasks, id up to which every pending
        task is in `tasks`, whether nothing after that id matches)."""
        plain = self._task_page(project_id, [_id_after(cursor), _versions_filter("not_contains", [model_version])],
                                page_size=page_size, include="id,data", ids=ids, may_lack_predictions=True)
        if not confusable:
            scanned_to = plain.tasks[-1]["id"] if plain.more else cursor
            return [_public(t) for t in plain.tasks], scanned_to, not plain.more
        # The tasks that not_contains hid for a confusable version: those that hold
        # one (and ours, by substring). Disjoint from `plain`; exact on this side.
        hidden = self._task_page(
            project_id,
            [_id_after(cursor), _versions_filter("contains", [model_version]),
             _versions_filter("contains", confusable)],
            page_size=page_size, include="id,data,predictions_model_versions", ids=ids)
        limits = [page.tasks[-1]["id"] for page in (plain, hidden) if page.more]
        scanned_to = min(limits) if limits else None
        found = {t["id"]: t for t in plain.tasks if scanned_to is None or t["id"] <= scanned_to}
        for task in hidden.tasks:
            if scanned_to is not None and task["id"] > scanned_to:
                break
            if not self._holds(task, model_version, readable):
                found[task["id"]] = task
        tasks = [_public(found[i]) for i in sorted(found)]
        return tasks, scanned_to if scanned_to is not None else cursor, scanned_to is None

    def _count_confusable_pending(self, project_id: int, model_version: str, ids: list[int] | None,
                                  confusable: list[str], readable: bool) -> int:
        count, cursor = 0, 0
        while True:
            page = self._task_page(
                project_id,
                [_id_after(cursor), _versions_filter("contains", [model_version]),
                 _versions_filter("contains", confusable)],
                page_size=SCAN_PAGE_SIZE, include="id,predictions_model_versions", ids=ids)
            count += sum(1 for task in page.tasks if not self._holds(task, model_version, readable))
            if not page.more or not page.tasks:
                return count
            cursor = page.tasks[-1]["id"]

    def _confusable_versions(self, project_id: int, model_version: str) -> tuple[list[str], bool]:
        """(the project's other model versions that contain ours, ignoring case,
        as Label Studio's substring filter does on SQLite; whether the version
        lists of tasks that hold them can be read exactly)."""
        path = f"/api/projects/{project_id}/model-versions/"
        answer = self._json("GET", path, max_bytes=VERSIONS_MAX_BYTES)
        if not isinstance(answer, dict):
            raise LabelStudioAPIError(f"GET {path}: the answer is not a map of model versions")
        ours = model_version.lower()
        confusable = sorted(v for v in answer if isinstance(v, str) and v != model_version and ours in v.lower())
        readable = not any(_ambiguous(v) for v in [model_version, *confusable])
        return confusable, readable

    def _holds(self, task: dict, model_version: str, readable: bool) -> bool:
        holds = self._holds_from_list(task, model_version, readable)
        return self._holds_by_lookup(task["id"], model_version) if holds is None else holds

    @staticmethod
    def _holds_from_list(task: dict, model_version: str, readable: bool) -> bool | None:
        """From the page's version list ("v1,v12" on SQLite, "v1, v12" on
        PostgreSQL); None when the list cannot say for sure."""
        listed = task.get("predictions_model_versions")
        if not readable or not isinstance(listed, str) or len(listed) >= WHOLE_VERSION_LIST_CHARS:
            return None
        return model_version in {v.strip() for v in listed.split(",")}

    def _holds_by_lookup(self, task_id: int, model_version: str) -> bool:
        answer = self._json("GET", "/api/predictions/", {"task": task_id}, max_bytes=TASK_PAGE_MAX_BYTES)
        if not isinstance(answer, list):
            raise LabelStudioAPIError("GET /api/predictions/: the answer is not a list of predictions")
        return any(isinstance(p, dict) and p.get("model_version") == model_version for p in answer)

    # ------------------------------------------------------------- transport
    def _task_page(self, project_id: int, filters: list[dict], *, page_size: int, include: str,
                   ids: list[int] | None = None, may_lack_predictions: bool = False) -> _Page:
        """Page 1 of the Data Manager's task list, ordered by id."""
        if ids is not None and not ids:
            raise ValueError("an empty id list would select every task")  # Label Studio ignores `included: []`
        query = {
            "filters": {"conjunction": "and", "items": filters},
            "ordering": ["tasks:id"],
            "selectedItems": {"all": False, "included": ids} if ids is not None else {"all": True, "excluded": []},
        }
        params = {
            "project": project_id, "page": 1, "page_size": page_size, "include": include,
            "resolve_uri": "false",
            # Label Studio unquotes `query` once more after Django did
            # (data_manager/functions.py:297): a "%" must survive both.
            "query": json.dumps(query, separators=(",", ":"), ensure_ascii=False).replace("%", "%25"),
        }
        if may_lack_predictions:
            params["review"] = "true"  # no ML call from Label Studio for tasks without predictions
        answer = self._json("GET", "/api/tasks/", params, max_bytes=TASK_PAGE_MAX_BYTES)
        tasks = answer.get("tasks") if isinstance(answer, dict) else None
        total = answer.get("total") if isinstance(answer, dict) else None
        if not isinstance(tasks, list) or isinstance(total, bool) or not isinstance(total, int):
            raise LabelStudioAPIError("GET /api/tasks/: the answer is not a task page")
        for task in tasks:
            if not isinstance(task, dict) or isinstance(task.get("id"), bool) or not isinstance(task.get("id"), int):
                raise LabelStudioAPIError("GET /api/tasks/: a task without an integer id")
            if "data" in include.split(",") and not isinstance(task.get("data"), dict):
                raise LabelStudioAPIError(f"GET /api/tasks/: task {task['id']} has no data object")
        return _Page(tasks, total)

    def _json(self, method: str, path: str, params: dict | None = None, *, body: bytes | None = None,
              expect: int = 200, max_bytes: int = SMALL_MAX_BYTES):
        raw = self._exchange(method, path, params, body, expect, max_bytes)
        try:
            return json.loads(raw)
        except ValueError:
            raise LabelStudioAPIError(f"{method} {path}: the answer (HTTP {expect}) is not JSON",
                                      status=expect) from None

    def _exchange(self, method: str, path: str, params: dict | None, body: bytes | None, expect: int,
                  max_bytes: int) -> bytes:
        """One call (two when a personal access token's access token expired
        early: exchanged once more, as the image loader does)."""
        target = path + ("?" + urlencode(params, quote_via=quote, safe="") if params else "")
        where = f"{method} {path}"  # messages name the path only: the query is long (filters, ids)
        url = self.access.url_for(target)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                auth = self.auth.headers(force_refresh=attempt == 1)
            except TaskError as exc:
                refused = exc.failure.reason == "label_studio_auth" and not exc.failure.retriable
                raise LabelStudioAPIError(f"{where}: {exc.failure.message}", status=401 if refused else None,
                                          retriable=exc.failure.retriable) from None
            try:
                with request(url, policy=self.policy, limits=self.limits, trusted_host=True, method=method,
                             headers={**headers, **auth}, body=body) as resp:
                    status = resp.status
                    if status == 401 and attempt == 0 and self.auth.is_pat:
                        continue
                    if status == expect:
                        try:
                            return resp.read(max_bytes)
                        except TaskError as exc:
                            if exc.failure.reason == "too_large":
                                raise _TooLarge(f"{where}: HTTP {status}, but {exc.failure.message}",
                                                status=status) from None
                            raise
                    try:
                        detail = _error_text(resp.read(ERROR_BODY_MAX_BYTES), self._secrets())
                    except TaskError:
                        detail = ""
            except TaskError as exc:
                raise LabelStudioAPIError(f"{where}: {exc.failure.message}", retriable=exc.failure.retriable) from None
            raise self._status_error(where, status, detail)
        raise AssertionError("unreachable")

    def _status_error(self, where: str, status: int, detail: str) -> LabelStudioAPIError:
        if 300 <= status < 400:
            message = (f"{where}: Label Studio answered a redirect (HTTP {status}), which is not followed; "
                       "check the Label Studio URL (scheme, host and path prefix)")
        elif status in (401, 403):
            message = f"{where}: HTTP {status} (check the Label Studio API key and its permissions)"
        else:
            message = f"{where}: HTTP {status}"
        if detail and not 300 <= status < 400:
            message += f": {detail}"
        return LabelStudioAPIError(message, status=status, retriable=status >= 500 or status == 429)

    def _secrets(self) -> tuple[str, ...]:
        return (self.access.api_key or "", getattr(self.auth, "_access", None) or "")


def _public(task: dict) -> dict:
    return {"id": task["id"], "data": task["data"]}
