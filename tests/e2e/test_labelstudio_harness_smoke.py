"""Smoke test of the Label Studio harness (tests/labelstudio_server.py).

Starts a real Label Studio 1.23 (installed by scripts/install_labelstudio.sh
into its own venv; installed on first use if missing), creates a project,
imports an uploaded file and a URL task, checks all three kinds of token, and
runs "Retrieve Predictions" against a tiny stdlib stub ML backend.
"""
from __future__ import annotations

import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from labelstudio_server import LabelStudioClient

# Its own label config on purpose: plain labels, for the stub backend's answers (no model, no mapping).
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Airplane"/><Label value="Car"/>'
    "</RectangleLabels></View>"
)


def tiny_png(width: int = 8, height: int = 6) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class _Stub:
    """Stdlib HTTP server acting as an ML backend (or an image host)."""

    def __init__(self, predict=None, files=None):
        self.requests: list[tuple[str, str, object]] = []
        self.predict = predict
        self.files = files or {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append(("GET", self.path, None))
                if self.path == "/health":
                    self._send(200, {"status": "UP", "model_class": "Stub"})
                elif self.path in stub.files:
                    self._send(200, stub.files[self.path], "image/png")
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                stub.requests.append(("POST", self.path, body))
                if self.path == "/setup":
                    self._send(200, {"model_version": "stub-1"})
                elif self.path == "/predict":
                    self._send(200, stub.predict(body["tasks"]))
                else:
                    self._send(200, {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_starts_and_all_tokens_work(ls):
    assert requests.get(ls.url + "/health", timeout=5).json()["status"] == "UP"
    assert ls.client.whoami()["email"] == ls.username
    assert ls.client.legacy_token() == ls.legacy_token
    assert ls.client.jwt_settings() == {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
    # PAT -> access token -> Bearer auth
    assert ls.pat and ls.pat.count(".") == 2
    access = LabelStudioClient(ls.url).exchange_pat(ls.pat)
    assert LabelStudioClient(ls.url, token=access, scheme="Bearer").whoami()["email"] == ls.username
    assert ls.pat_client.whoami()["email"] == ls.username
    # the PAT itself is not a Bearer token
    r = requests.get(ls.url + "/api/current-user/whoami", headers={"Authorization": "Bearer " + ls.pat},
                     timeout=10)
    assert r.status_code == 401


def test_project_upload_and_url_tasks(ls):
    png = tiny_png()
    host = _Stub(files={"/remote.png": png})
    try:
        project = ls.client.create_project(LABEL_CONFIG, title="smoke")
        pid = project["id"]
        up = ls.client.import_files(pid, [("upload1.png", png)])
        assert up["task_count"] == 1 and len(up["task_ids"]) == 1
        url_task = ls.client.import_tasks(pid, [{"image": host.url + "/remote.png"}])
        assert url_task["task_count"] == 1

        task = ls.client.get_task(up["task_ids"][0])
        value = task["data"]["image"]
        assert value.startswith(f"/data/upload/{pid}/") and value.endswith("-upload1.png"), value
        on_disk = ls.upload_path(value)
        assert on_disk == ls.data_dir / "media" / "upload" / str(pid) / value.rsplit("/", 1)[1]
        assert on_disk.read_bytes() == png
        # what an ML backend does: hostname from /setup + relative path, legacy token
        assert ls.client.download(ls.hostname + value) == png

        tasks = ls.client.list_tasks(pid)
        assert sorted(t["id"] for t in tasks) == sorted(up["task_ids"] + url_task["task_ids"])
        assert {t["data"]["image"] for t in tasks} == {value, host.url + "/remote.png"}
    finally:
        host.close()


def _region(label="Airplane"):
    return {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 8, "original_height": 6, "image_rotation": 0,
            "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": [label]},
            "score": 0.9}


def test_retrieve_predictions_with_stub_backend(ls):
    # Task 0 gets a box, task 1 "failed": an item WITHOUT "result" -> Label Studio
    # stores nothing for it (so it can be predicted again) and keeps the others.
    def predict(tasks):
        out = []
        for i, _ in enumerate(tasks):
            if i == 1:
                out.append({"error": "image could not be loaded", "model_version": "stub-1"})
            else:
                out.append({"result": [_region()], "score": 0.9, "model_version": "stub-1"})
        return {"results": out}

    backend = _Stub(predict=predict)
    try:
        pid = ls.client.create_project(LABEL_CONFIG, title="smoke-ml")["id"]
        ids = ls.client.import_files(pid, [("a.png", tiny_png()), ("b.png", tiny_png())])["task_ids"]
        ml = ls.client.add_ml_backend(pid, backend.url, title="stub")
        assert ml["state"] == "CO" and ml["model_version"] == "stub-1"
        setup = [b for m, p, b in backend.requests if p == "/setup"][-1]
        assert setup["hostname"] == ls.hostname and setup["access_token"] == ls.legacy_token

        r = ls.client.retrieve_predictions(pid)
        assert r.json()["processed_items"] == 2
        predicts = [b for m, p, b in backend.requests if p == "/predict"]
        assert len(predicts) == 1 and sorted(t["id"] for t in predicts[0]["tasks"]) == sorted(ids)

        by_task = {t["id"]: i for i, t in enumerate(predicts[0]["tasks"])}
        ok_task = next(t for t, i in by_task.items() if i == 0)
        failed_task = next(t for t, i in by_task.items() if i == 1)
        stored = ls.client.predictions(ok_task)
        assert len(stored) == 1 and stored[0]["model_version"] == "stub-1"
        assert stored[0]["result"][0]["value"]["rectanglelabels"] == ["Airplane"]
        assert ls.client.predictions(failed_task) == []
        assert "ML backend returns an incorrect prediction" in ls.log_text()

        # Opening the failed task asks the backend again for just that task.
        ls.client.get_task(failed_task)
        predicts = [b for m, p, b in backend.requests if p == "/predict"]
        assert len(predicts) == 2 and [t["id"] for t in predicts[1]["tasks"]] == [failed_task]
    finally:
        backend.close()
