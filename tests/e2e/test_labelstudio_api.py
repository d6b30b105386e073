"""LabelStudioAPI (mmdet_ls/labelstudio_api.py) against a real Label Studio 1.23.

One Label Studio for the module (the `ls` fixture). Each test makes its own
project with URL tasks (never fetched: no ML backend is needed for the API
itself), writes predictions through the API under test and reads them back
through the harness's client. Two tests connect a stub ML backend (stdlib
http.server) to pin what Label Studio sends it: the TASKS_CREATED webhook,
and no /predict call caused by the job's own task listing.
"""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmdet_ls.image_sources import LabelStudioAccess
from mmdet_ls.labelstudio_api import LabelStudioAPI, LabelStudioAPIError

pytestmark = pytest.mark.timeout(300)

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Airplane"/><Label value="Car"/>'
    "</RectangleLabels></View>"
)


def region(label: str = "Car", x: float = 10.0) -> dict:
    return {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 640, "original_height": 480,
            "value": {"x": x, "y": 20.0, "width": 30.0, "height": 15.5, "rotation": 0, "rectanglelabels": [label]}}


def prediction(task_id: int, model_version: str, **fields) -> dict:
    item = {"task": task_id, "result": [region()], "score": 0.75, "model_version": model_version}
    item.update(fields)
    return item


def new_project(ls, n_tasks: int, title: str) -> tuple[int, list[int]]:
    project = ls.client.create_project(LABEL_CONFIG, title=title)
    imported = ls.client.import_tasks(project["id"], [{"image": f"http://127.0.0.1:9/{title}-{i}.png"}
                                                      for i in range(n_tasks)])
    return project["id"], sorted(imported["task_ids"])


def keys_of(ls) -> list[str]:
    return [k for k in (ls.legacy_token, ls.pat, ls.access_token) if k]


def assert_no_key(ls, exc: Exception) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'message', '')}"
    for key in keys_of(ls):
        assert key not in text


@pytest.fixture(scope="module")
def api(ls):
    return LabelStudioAPI(LabelStudioAccess.from_text(ls.url, ls.legacy_token))


@pytest.fixture(scope="module")
def pat_api(ls):
    return LabelStudioAPI(LabelStudioAccess.from_text(ls.url, ls.pat))


class StubBackend:
    """An ML backend that answers /health and /setup, and records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                self._answer({"status": "UP", "model_class": "Stub"})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(raw or b"null")})
                self._answer({"model_version": "stub-1"} if self.path.startswith("/setup") else {"results": []})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posts(self, prefix: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"].startswith(prefix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub_backend():
    stub = StubBackend()
    yield stub
    stub.close()


def test_project(api, ls):
    pid, _ = new_project(ls, 1, "api-project")
    assert api.project(pid) == {"id": pid, "title": "api-project", "label_config": LABEL_CONFIG}
    with pytest.raises(LabelStudioAPIError) as err:
        api.project(999_999)
    assert err.value.status == 404 and not err.value.retriable
    assert "/api/projects/999999/" in str(err.value) and "404" in str(err.value)


def test_keyset_pages_while_predictions_land(pat_api, ls):
    """Every pending task exactly once, in id order, while the job writes:
    page numbers over the shrinking set would skip a page's worth of tasks."""
    pid, ids = new_project(ls, 250, "api-keyset")
    version = "job-v1"
    assert pat_api.count_pending(pid, version) == 250
    ahead = ids[230:235]  # written by "another worker" before the job reaches them
    seen: list[int] = []
    after = 0
    while True:
        page = pat_api.pending_tasks(pid, version, after_id=after, page_size=100)
        if not page:
            break
        assert all(set(task) == {"id", "data"} for task in page)
        assert page[0]["data"]["image"].startswith("http://127.0.0.1:9/api-keyset-")
        seen += [task["id"] for task in page]
        after = page[-1]["id"]
        created = pat_api.import_predictions(pid, [prediction(task["id"], version) for task in page])
        assert created == len(page)
        if len(seen) == 100:
            assert pat_api.count_pending(pid, version) == 150
            assert pat_api.import_predictions(pid, [prediction(t, version) for t in ahead]) == 5
            assert pat_api.count_pending(pid, version) == 145
    assert seen == [t for t in ids if t not in ahead]
    assert pat_api.count_pending(pid, version) == 0
    assert pat_api.tasks_with_prediction(pid, ids, version) == set(ids)


def test_other_model_versions_do_not_hide_tasks(api, ls):
    """Label Studio's filter matches substrings ("v12" and "V1" contain "v1"
    for SQLite's LIKE); what counts is exact equality."""
    pid, ids = new_project(ls, 8, "api-versions")
    versions_of = {
        ids[0]: [],
        ids[1]: ["v12"],
        ids[2]: ["V1"],
        ids[3]: ["v1"],
        ids[4]: ["v1", "v12"],
        ids[5]: ["xv1x", "v1x"],
        ids[6]: ["v"],
        ids[7]: ["v1", "v1"],
    }
    items = [prediction(task, version) for task, versions in versions_of.items() for version in versions]
    assert api.import_predictions(pid, items) == len(items)

    def pending(version: str, page_size: int, task_ids=None) -> list[int]:
        out, after = [], 0
        while page := api.pending_tasks(pid, version, after_id=after, page_size=page_size, task_ids=task_ids):
            out += [task["id"] for task in page]
            after = page[-1]["id"]
        return out

    v1_pending = [ids[0], ids[1], ids[2], ids[5], ids[6]]
    for page_size in (100, 2, 1):
        assert pending("v1", page_size) == v1_pending
    assert api.count_pending(pid, "v1") == 5
    assert api.tasks_with_prediction(pid, ids, "v1") == {ids[3], ids[4], ids[7]}
    # The other way round: "v1" is a substring of "v12", and no version contains "v12".
    assert pending("v12", 3) == [ids[0], ids[2], ids[3], ids[5], ids[6], ids[7]]
    assert api.count_pending(pid, "v12") == 6
    assert api.tasks_with_prediction(pid, ids, "v12") == {ids[1], ids[4]}
    # Case matters: "V1" is not "v1".
    assert api.tasks_with_prediction(pid, ids, "V1") == {ids[2]}
    # task_ids restricts (ids of other projects and unknown ids are simply not there).
    subset = [ids[1], ids[3], ids[5], 999_999]
    assert pending("v1", 1, subset) == [ids[1], ids[5]]
    assert api.count_pending(pid, "v1", subset) == 2
    assert api.pending_tasks(pid, "v1", task_ids=[]) == []
    assert api.count_pending(pid, "v1", task_ids=[]) == 0
    assert api.tasks_with_prediction(pid, [], "v1") == set()


def test_versions_with_awkward_characters(api, ls):
    """A "%" survives Label Studio's second unquote; a "," in a confusable
    version makes the version lists ambiguous: checked task by task."""
    pid, ids = new_project(ls, 4, "api-awkward")
    api.import_predictions(pid, [prediction(ids[0], "m%41"), prediction(ids[1], "mA"),
                                 prediction(ids[2], "x,m%41"), prediction(ids[3], "m%41 ")])
    assert [t["id"] for t in api.pending_tasks(pid, "m%41")] == [ids[1], ids[2], ids[3]]
    assert api.count_pending(pid, "m%41") == 3
    assert api.tasks_with_prediction(pid, ids, "m%41") == {ids[0]}
    assert api.tasks_with_prediction(pid, ids, "x,m%41") == {ids[2]}


def test_import_predictions_read_back(api, ls):
    pid, ids = new_project(ls, 2, "api-import")
    items = [prediction(ids[0], "rb-1", score=0.25), prediction(ids[1], "rb-1", result=[region("Airplane", 5.5),
                                                                                       region("Car", 60)])]
    assert api.import_predictions(pid, items) == 2
    assert api.import_predictions(pid, []) == 0
    for item in items:
        stored = ls.client.predictions(item["task"])
        assert len(stored) == 1
        assert stored[0]["result"] == item["result"]
        assert stored[0]["score"] == item["score"]
        assert stored[0]["model_version"] == "rb-1"
        assert stored[0]["project"] == pid


@pytest.mark.parametrize("bad", ["unknown task", "label not in config", "box out of bounds", "score above 1"])
def test_one_invalid_item_rejects_the_whole_import(api, ls, bad):
    pid, ids = new_project(ls, 2, "api-invalid")
    invalid = {
        "unknown task": prediction(999_999, "iv-1"),
        "label not in config": prediction(ids[1], "iv-1", result=[region("Truck")]),
        "box out of bounds": prediction(ids[1], "iv-1", result=[region(x=150)]),
        "score above 1": prediction(ids[1], "iv-1", score=7),
    }[bad]
    with pytest.raises(LabelStudioAPIError) as err:
        api.import_predictions(pid, [prediction(ids[0], "iv-1"), invalid])
    exc = err.value
    assert exc.status == 400 and not exc.retriable
    assert str(exc).startswith(f"POST /api/projects/{pid}/import/predictions: HTTP 400: Validation error")
    assert "Prediction 1" in str(exc) and len(str(exc)) < 700
    assert_no_key(ls, exc)
    # nothing from that call was stored, not even the valid item
    assert ls.client.predictions(ids[0]) == [] and ls.client.predictions(ids[1]) == []
    assert api.tasks_with_prediction(pid, ids, "iv-1") == set()


def test_wrong_keys_are_refused_and_never_quoted(ls):
    pid, _ = new_project(ls, 1, "api-keys")
    wrong_legacy = LabelStudioAPI(LabelStudioAccess.from_text(ls.url, "not-the-token-0123456789"))
    claims = base64.urlsafe_b64encode(json.dumps({"token_type": "refresh", "exp": 4102444800}).encode()).decode()
    fake_pat = f"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{claims.rstrip('=')}.c2lnbmF0dXJl"
    wrong_pat = LabelStudioAPI(LabelStudioAccess.from_text(ls.url, fake_pat))
    for client, key in ((wrong_legacy, "not-the-token-0123456789"), (wrong_pat, fake_pat)):
        for method, args in (("project", (pid,)), ("count_pending", (pid, "v")),
                             ("import_predictions", (pid, [prediction(1, "v")]))):
            with pytest.raises(LabelStudioAPIError) as err:
                getattr(client, method)(*args)
            assert err.value.status == 401 and not err.value.retriable
            assert key not in f"{err.value} {err.value!r}"
            assert_no_key(ls, err.value)
        assert key not in repr(client)


def test_legacy_token_and_personal_access_token_both_work(api, pat_api, ls):
    pid, ids = new_project(ls, 3, "api-tokens")
    assert api.project(pid)["id"] == pat_api.project(pid)["id"] == pid
    assert pat_api.import_predictions(pid, [prediction(ids[0], "tk-1")]) == 1
    assert [t["id"] for t in api.pending_tasks(pid, "tk-1")] == ids[1:]
    # An access token that Label Studio no longer takes: exchanged once more, then the call works.
    pat_api.auth.headers()
    pat_api.auth._access = "expired.access.token"
    assert pat_api.count_pending(pid, "tk-1") == 2
    assert pat_api.auth._access != "expired.access.token"


def test_listing_never_makes_label_studio_call_the_backend(api, ls, stub_backend):
    """With "evaluate predictions automatically" on, Label Studio's task list
    asks the ML backend (us) to predict the page's tasks that have none,
    inside our request; the API lists such tasks with review=true."""
    pid, ids = new_project(ls, 3, "api-no-ml-call")
    ls.client.add_ml_backend(pid, stub_backend.url)
    ls.client.update_project(pid, evaluate_predictions_automatically=True)
    api.import_predictions(pid, [prediction(ids[0], "nm-1")])
    before = len(stub_backend.posts("/predict"))
    assert [t["id"] for t in api.pending_tasks(pid, "nm-1")] == ids[1:]
    assert api.count_pending(pid, "nm-1") == 2
    assert api.tasks_with_prediction(pid, ids, "nm-1") == {ids[0]}
    assert len(stub_backend.posts("/predict")) == before
    # the control: Label Studio's own listing does call it
    ls.client.get("/api/tasks/", params={"project": pid})
    assert len(stub_backend.posts("/predict")) == before + 1


def test_tasks_created_webhook_as_label_studio_sends_it(ls, stub_backend):
    """What the ML backend's auto-created webhook gets (docs/labelstudio-notes.md,
    "Bulk prediction API"): the full tasks and project, no basic auth, a query
    string mangled into the URL; custom headers can be set on the webhook."""
    pid = ls.client.create_project(LABEL_CONFIG, title="api-webhook")["id"]
    ls.client.add_ml_backend(pid, stub_backend.url + "/?token=abc", auth_method="BASIC_AUTH",
                             basic_auth_user="ls-user", basic_auth_pass="ls-pass")
    setup = stub_backend.posts("/setup")
    assert setup and all(r["path"] == "/setup" for r in setup)  # the query does not reach /setup
    basic = "Basic " + base64.b64encode(b"ls-user:ls-pass").decode()
    assert setup[-1]["headers"].get("Authorization") == basic
    hooks = [h for h in ls.client.get("/api/webhooks/", params={"project": pid}) if h["project"] == pid]
    assert [h["url"] for h in hooks] == [stub_backend.url + "/?token=abc/webhook"]

    imported = ls.client.import_tasks(pid, [{"image": "http://127.0.0.1:9/a.png"}, {"image": "http://127.0.0.1:9/b.png"}])
    [call] = stub_backend.posts("/?token=abc/webhook")
    assert "Authorization" not in call["headers"]
    body = call["body"]
    assert set(body) == {"action", "tasks", "project"} and body["action"] == "TASKS_CREATED"
    assert [t["id"] for t in body["tasks"]] == imported["task_ids"]
    assert body["tasks"][0]["data"] == {"image": "http://127.0.0.1:9/a.png"}
    assert body["tasks"][0]["project"] == pid
    assert body["project"]["id"] == pid and body["project"]["label_config"] == LABEL_CONFIG

    ls.client.patch(f"/api/webhooks/{hooks[0]['id']}/", {"headers": {"Authorization": basic, "X-Backend-Token": "t"}})
    ls.client.import_tasks(pid, [{"image": "http://127.0.0.1:9/c.png"}])
    last = stub_backend.posts("/?token=abc/webhook")[-1]
    assert last["headers"].get("Authorization") == basic and last["headers"].get("X-Backend-Token") == "t"
    # A host name without a dot (a Docker service name) is not a valid webhook URL
    # for Label Studio's URLField, so no webhook is auto-created for such a backend.
    refused = ls.client.request("POST", "/api/webhooks/", expect=None,
                                json={"project": pid, "url": "http://ml-backend:9090/webhook"})
    assert refused.status_code == 400
