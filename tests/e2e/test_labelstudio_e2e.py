"""End to end against a real Label Studio 1.23: what a user does, checked on
what Label Studio stores.

Label Studio (tests/labelstudio_server.py) and our service (the Ray Serve
graph, in-process, with the toy RTMDet trained on synthetic scenes) start once
for the module. Each scenario makes its own Label Studio project, imports
images the ways a user does (file upload, image URL, an EXIF-rotated JPEG, a
grayscale PNG), connects the service by its URL (POST /api/ml), runs
"Retrieve predictions" and reads the predictions back from Label Studio's API.
Label Studio answers "Retrieved N predictions" even when the backend failed,
so only what it stored counts.

Label Studio reaches the service through a tiny counting reverse proxy (stdlib
http.server) that records every call and answer, so "was /predict called, and
with which tasks" is exact and immediate (Ray's metrics lag by seconds).
Which way an upload was read (image_dir on this machine vs. a download from
Label Studio) is read from Label Studio's own request log.

The ways of reaching uploads are redeployments of the same application with
new args (serve.run), so Ray and the model start once:
* image_dir = Label Studio's <data_dir>/media/upload (same machine);
* image_dir empty, LABEL_STUDIO_URL + a legacy token as the key;
* image_dir empty, legacy tokens disabled in the organisation, a personal
  access token as the key (/setup still sends the dead legacy token: with it
  as the key the uploads fail, with the PAT they work).
The key is never an app arg: it is written to the file that
LABEL_STUDIO_API_KEY_FILE names in Ray's environment, as an operator mounts a
secret, and the application is redeployed.
"""
from __future__ import annotations

import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from image_server import ImageServer
from labelstudio_server import LabelStudioClient, LabelStudioServer
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from PIL import Image, ImageOps
from serve_fixtures import wait_ready
from toy_detector.scenes import iou, make_scene

from serve_app import AppArgs, build_app

pytestmark = pytest.mark.timeout(600)

# Its own label config on purpose: the toy classes exactly as LABEL_OF_CLASS maps them.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Vehicle" predicted_values="car,airplane"/>'
    '<Label value="Person" predicted_values="person"/>'
    "</RectangleLabels></View>"
)
LABEL_OF_CLASS = {"car": "Vehicle", "airplane": "Vehicle", "person": "Person"}
MIN_IOU = 0.8

# Scenes (seed, displayed width, height), held out from the toy detector's
# training (seeds 0..1999 and 500000..); 1-4 objects each, all three classes.
# Screened once through the service's own decode/detect/postprocess code: the
# toy detector finds every object of each as stored here (PNG, grayscale PNG,
# EXIF 6/8 JPEG) at IoU >= 0.92 with no stray box, so a failure here is the
# pipeline's, not the model's.
SCENES = {
    "upload": (1000002, 360, 280),  # car, person, airplane
    "url": (1000000, 320, 300),  # airplane, car, person
    "exif": (1000003, 380, 290),  # person, airplane, person
    "gray": (1000001, 300, 340),  # person, car
    "missing": (1000002, 340, 300),  # the 404 task, once its file exists: person, car, 2 airplanes
    "opened": (1000000, 330, 310),  # imported later, predicted on opening: 3 cars
}


# ------------------------------------------------------------------ images
class SceneImage:
    """One task image: the encoded file, and its truth in the displayed frame."""

    def __init__(self, name: str, data: bytes, size: tuple[int, int], objects: list[dict]):
        self.name, self.data, self.size, self.objects = name, data, size, objects


def scene_png(kind: str, gray: bool = False) -> SceneImage:
    seed, w, h = SCENES[kind]
    img, objects = make_scene(seed, w, h)
    if gray:
        img = img.convert("L")  # a true one-channel PNG
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return SceneImage(f"scene-{kind}.png", buf.getvalue(), (w, h), objects)


# EXIF Orientation -> how the stored pixels are turned from the displayed ones
# (the inverse of what a viewer, and ImageOps.exif_transpose, applies).
_STORE_TRANSPOSE = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def exif_rotated_jpeg(kind: str, orientation: int) -> SceneImage:
    """A JPEG whose pixels are stored rotated by 90 degrees with EXIF Orientation
    6 or 8, so that viewers (Label Studio's <img>) show the upright scene. The
    truth is in that displayed frame: the scene's own boxes and size (the stored
    pixel frame is the scene turned by 90 degrees, width and height swapped)."""
    seed, w, h = SCENES[kind]
    displayed, objects = make_scene(seed, w, h)
    stored = displayed.transpose(_STORE_TRANSPOSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    # The fixture itself: stored frame is turned, displayed frame is the scene.
    check = Image.open(io.BytesIO(data))
    assert check.size == (h, w) and check.getexif().get(0x0112) == orientation
    assert ImageOps.exif_transpose(check).size == (w, h)
    return SceneImage(f"scene-{kind}-exif{orientation}.jpg", data, (w, h), objects)


# ---------------------------------------------------------- counting proxy
class CountingProxy:
    """Reverse proxy in front of the service: forwards every request and records
    (method, path, request JSON, status, response JSON)."""

    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        session = requests.Session()
        session.trust_env = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "authorization", "accept")}
                try:
                    resp = session.request(self.command, proxy.target + self.path, data=body or None,
                                           headers=headers, timeout=120)
                    status, content = resp.status_code, resp.content
                    ctype = resp.headers.get("Content-Type", "application/json")
                except requests.RequestException as exc:
                    status, content, ctype = 502, json.dumps({"proxy_error": repr(exc)}).encode(), "application/json"
                proxy._record(self.command, self.path, body, status, content)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _json(raw: bytes):
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _record(self, method, path, body, status, content):
        with self._lock:
            self.calls.append({"method": method, "path": path.split("?", 1)[0], "request": self._json(body),
                               "status": status, "response": self._json(content)})

    def mark(self) -> int:
        with self._lock:
            return len(self.calls)

    def predict_calls(self, since: int = 0) -> list[dict]:
        with self._lock:
            return [c for c in self.calls[since:] if c["path"] == "/predict"]

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


def task_ids_of(call: dict) -> list[int]:
    return [t["id"] for t in call["request"]["tasks"]]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images(tmp_path_factory, image_server):
    return image_server(tmp_path_factory.mktemp("http-images"))


@pytest.fixture(scope="module")
def backend(ls, tmp_path_factory, ray_serve):
    """Our service on Ray Serve (started once), behind a counting proxy.

    `deploy(**args)` redeploys the same application with other args."""
    if not Path(TOY_CHECKPOINT).is_file():
        pytest.fail(f"toy checkpoint {TOY_CHECKPOINT} missing: run tests/toy_detector/train.py")
    empty_dir = tmp_path_factory.mktemp("empty-image-dir")
    key_file = tmp_path_factory.mktemp("secrets") / "label-studio-key"
    key_file.write_text("")
    env = pytest.MonkeyPatch()
    env.setenv("LABEL_STUDIO_API_KEY_FILE", str(key_file))  # before Ray starts: replicas inherit it
    base = AppArgs(
        config_file=str(TOY_CONFIG),
        checkpoint_file=str(TOY_CHECKPOINT),
        image_dir=str(ls.data_dir / "media" / "upload"),  # Label Studio's own upload folder
        allowed_hosts=["127.0.0.1"],  # the image URL server
    )
    proxy = None
    try:
        url = ray_serve(build_app(base))
        health = wait_ready(url)
        proxy = CountingProxy(url)
        state = {"args": base, "key": ""}

        def deploy(api_key: str = "", **overrides) -> dict:
            args = base.model_copy(update=overrides)
            if args != state["args"] or api_key != state["key"]:
                from ray import serve

                key_file.write_text(api_key)  # the ingress reads it when it starts
                serve.run(build_app(args), name="mmdet-backend", route_prefix="/")
                state.update(args=args, key=api_key)
            return wait_ready(url)

        yield {"url": url, "proxy": proxy, "model_version": health["model_version"], "deploy": deploy,
               "empty_dir": str(empty_dir)}
    finally:
        if proxy is not None:
            proxy.close()
        env.undo()


# ---------------------------------------------------------------- helpers
def region_box(region: dict) -> tuple[float, float, float, float]:
    v = region["value"]
    return v["x"], v["y"], v["x"] + v["width"], v["y"] + v["height"]


def percent_box(bbox, size) -> tuple[float, float, float, float]:
    w, h = size
    x1, y1, x2, y2 = bbox
    return 100 * x1 / w, 100 * y1 / h, 100 * x2 / w, 100 * y2 / h


def assert_prediction_matches(prediction: dict, expected: SceneImage, model_version: str) -> None:
    """One stored prediction against the truth of its image (displayed frame, %)."""
    where = f"{expected.name}: {json.dumps(prediction['result'])[:1500]}"
    assert prediction["model_version"] == model_version, where
    regions = prediction["result"]
    assert regions, f"no region stored for {where}"
    for r in regions:
        assert (r["from_name"], r["to_name"], r["type"]) == ("label", "image", "rectanglelabels"), where
        assert (r["original_width"], r["original_height"]) == expected.size, where
        assert r["value"]["rectanglelabels"] in (["Vehicle"], ["Person"]), where
        x1, y1, x2, y2 = region_box(r)
        assert 0 <= x1 < x2 <= 100 + 1e-6 and 0 <= y1 < y2 <= 100 + 1e-6, f"region outside 0-100: {where}"
    truth = [(LABEL_OF_CLASS[o["label"]], percent_box(o["bbox"], expected.size)) for o in expected.objects]
    for label, box in truth:
        best = max((iou(box, region_box(r)) for r in regions if r["value"]["rectanglelabels"] == [label]),
                   default=0.0)
        assert best >= MIN_IOU, f"{label} at {box} found with IoU {best:.2f} only; {where}"
    for r in regions:  # no stray boxes either
        best = max((iou(box, region_box(r)) for label, box in truth
                    if [label] == r["value"]["rectanglelabels"]), default=0.0)
        assert best >= 0.5, f"region {region_box(r)} matches no object; {where}"


def upload_log_lines(ls: LabelStudioServer, project_id: int) -> list[tuple[str, int]]:
    """(path, status) of every GET of this project's uploads in Label Studio's request log."""
    pattern = re.compile(rf'"GET (/data/upload/{project_id}/[^ ?"]+)[^"]*" (\d{{3}})')
    return sorted({(m.group(1), int(m.group(2))) for m in pattern.finditer(ls.log_text())})


class Project:
    """A Label Studio project with the standard tasks, connected to our service."""

    def __init__(self, client: LabelStudioClient, title: str, uploads: list[SceneImage],
                 urls: dict[str, SceneImage | None], images: ImageServer):
        self.client = client
        self.id = client.create_project(LABEL_CONFIG, title=title)["id"]
        self.expected: dict[int, SceneImage | None] = {}
        self.upload_values: dict[int, str] = {}
        ids = client.import_files(self.id, [(u.name, u.data) for u in uploads])["task_ids"]
        assert len(ids) == len(uploads)
        for task in client.list_tasks(self.id):
            value = task["data"]["image"]
            assert value.startswith(f"/data/upload/{self.id}/"), value
            (match,) = [u for u in uploads if value.endswith("-" + u.name)]
            self.expected[task["id"]] = match
            self.upload_values[task["id"]] = value
        self.url_tasks: dict[str, int] = {}
        for filename, image in urls.items():
            if image is not None:
                (images.root / filename).write_bytes(image.data)
            (tid,) = client.import_tasks(self.id, [{"image": f"{images.url}/{filename}"}])["task_ids"]
            self.expected[tid] = image
            self.url_tasks[filename] = tid
        self.ml_id = None

    def connect(self, backend_url: str, model_version: str) -> None:
        ml = self.client.add_ml_backend(self.id, backend_url, title="mmdet")
        assert ml["state"] == "CO", ml
        assert ml["model_version"] == model_version, ml
        self.ml_id = ml["id"]

    def retrieve(self, task_ids=None) -> dict:
        resp = self.client.retrieve_predictions(self.id, task_ids)
        return resp.json()

    def predictions(self, task_id: int) -> list[dict]:
        return self.client.predictions(task_id)


def assert_all_predicted(project: Project, model_version: str, skip=()) -> None:
    for task_id, expected in project.expected.items():
        if task_id in skip:
            continue
        stored = project.predictions(task_id)
        assert len(stored) == 1, f"task {task_id} ({expected.name}): {len(stored)} predictions stored"
        assert_prediction_matches(stored[0], expected, model_version)


def standard_uploads(orientation: int) -> list[SceneImage]:
    return [scene_png("upload"), exif_rotated_jpeg("exif", orientation), scene_png("gray", gray=True)]


# ------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def same_machine(ls, images, backend):
    """Project 1: uploads read from Label Studio's upload folder (image_dir), an
    image URL, and a URL that answers 404, all in one "Retrieve predictions"."""
    backend["deploy"]()  # base args: image_dir = <data_dir>/media/upload
    project = Project(ls.client, "same machine", standard_uploads(6),
                      {"p1-url.png": scene_png("url"), "p1-missing.png": None}, images)
    project.connect(backend["proxy"].url, backend["model_version"])
    mark = backend["proxy"].mark()
    answer = project.retrieve()
    return {"project": project, "answer": answer, "calls": backend["proxy"].predict_calls(mark),
            "missing": project.url_tasks["p1-missing.png"]}


def test_retrieve_predictions_reads_uploads_from_image_dir(ls, backend, same_machine):
    project, missing = same_machine["project"], same_machine["missing"]
    assert same_machine["answer"]["processed_items"] == len(project.expected)
    # One /predict call carried every task; each answer is in task order.
    (call,) = same_machine["calls"]
    assert sorted(task_ids_of(call)) == sorted(project.expected)
    assert call["status"] == 200 and len(call["response"]["results"]) == len(project.expected)
    assert_all_predicted(project, backend["model_version"], skip={missing})
    # Uploads came from the disk: the service never asked Label Studio for them.
    assert upload_log_lines(ls, project.id) == []


def test_unloadable_image_gets_no_prediction_and_is_retried(ls, backend, images, same_machine):
    project, missing = same_machine["project"], same_machine["missing"]
    (call,) = same_machine["calls"]
    item = call["response"]["results"][task_ids_of(call).index(missing)]
    assert "result" not in item and item["error_reason"] == "http_404", item
    assert project.predictions(missing) == []
    assert "ML backend returns an incorrect prediction" in ls.log_text()  # LS skipped that item

    # The image appears; the next "Retrieve predictions" sends only that task.
    retried = scene_png("missing")
    (images.root / "p1-missing.png").write_bytes(retried.data)
    project.expected[missing] = retried
    mark = backend["proxy"].mark()
    project.retrieve()
    (call,) = backend["proxy"].predict_calls(mark)
    assert task_ids_of(call) == [missing]
    assert_all_predicted(project, backend["model_version"])


def test_second_retrieve_with_same_model_version_does_not_call_predict(backend, same_machine):
    project = same_machine["project"]
    # Every task has its prediction (after the retry above; run alone: the tasks that have one).
    done = [t for t in project.expected if project.predictions(t)]
    assert len(done) >= len(project.expected) - 1
    proxy = backend["proxy"]
    mark = proxy.mark()
    answer = project.retrieve(None if len(done) == len(project.expected) else done)
    assert answer["processed_items"] == len(done)
    calls = proxy.calls[mark:]
    assert {c["path"] for c in calls} >= {"/health", "/setup"}, calls  # LS did talk to the service...
    assert proxy.predict_calls(mark) == []  # ...but asked for no prediction
    assert all(len(project.predictions(t)) == 1 for t in done)


def test_opening_a_task_without_prediction_predicts_it(backend, images, same_machine):
    project = same_machine["project"]
    opened = scene_png("opened")
    (images.root / "p1-opened.png").write_bytes(opened.data)
    (task_id,) = project.client.import_tasks(project.id, [{"image": f"{images.url}/p1-opened.png"}])["task_ids"]
    project.expected[task_id] = opened
    proxy = backend["proxy"]
    mark = proxy.mark()
    project.client.get_task(task_id)  # what the labeling UI does when the task is opened
    (call,) = proxy.predict_calls(mark)
    assert task_ids_of(call) == [task_id]
    stored = project.predictions(task_id)
    assert len(stored) == 1
    assert_prediction_matches(stored[0], opened, backend["model_version"])
    # Opening it again: it has a prediction now, so no new call.
    mark = proxy.mark()
    project.client.get_task(task_id)
    assert proxy.predict_calls(mark) == []
    assert len(project.predictions(task_id)) == 1


def test_downloads_uploads_from_label_studio_with_legacy_token(ls, backend, images):
    health = backend["deploy"](image_dir=backend["empty_dir"], label_studio_url=ls.url,
                               api_key=ls.legacy_token)
    assert health["model_version"] == backend["model_version"]
    project = Project(ls.client, "download legacy", standard_uploads(8), {"p2-url.png": scene_png("url")}, images)
    project.connect(backend["proxy"].url, backend["model_version"])
    mark = backend["proxy"].mark()
    project.retrieve()
    assert len(backend["proxy"].predict_calls(mark)) == 1
    assert_all_predicted(project, backend["model_version"])
    # Every upload was downloaded from Label Studio, with success.
    assert upload_log_lines(ls, project.id) == sorted((v, 200) for v in project.upload_values.values())


def test_downloads_uploads_with_personal_access_token_when_legacy_tokens_are_off(ls, backend, images):
    client = ls.pat_client
    client.set_jwt_settings(legacy_api_tokens_enabled=False)
    try:
        assert requests.get(ls.url + "/api/current-user/whoami", timeout=10,
                            headers={"Authorization": f"Token {ls.legacy_token}"}).status_code == 401
        project = Project(client, "download pat", standard_uploads(6), {"p3-url.png": scene_png("url")}, images)
        url_task = project.url_tasks["p3-url.png"]
        uploads = set(project.upload_values)

        # The legacy token (also what /setup sends) is dead: uploads cannot be read.
        backend["deploy"](image_dir=backend["empty_dir"], label_studio_url=ls.url,
                          api_key=ls.legacy_token)
        project.connect(backend["proxy"].url, backend["model_version"])
        mark = backend["proxy"].mark()
        project.retrieve()
        (call,) = backend["proxy"].predict_calls(mark)
        results = dict(zip(task_ids_of(call), call["response"]["results"]))
        assert {t for t, r in results.items() if "result" not in r} == uploads
        assert {results[t]["error_reason"] for t in uploads} == {"http_401"}
        assert all(project.predictions(t) == [] for t in uploads)
        (stored,) = project.predictions(url_task)  # image URLs need no token
        assert_prediction_matches(stored, project.expected[url_task], backend["model_version"])

        # The operator sets the PAT: the failed uploads are predicted on the next retrieve.
        backend["deploy"](image_dir=backend["empty_dir"], label_studio_url=ls.url, api_key=ls.pat)
        mark = backend["proxy"].mark()
        project.retrieve()
        (call,) = backend["proxy"].predict_calls(mark)
        assert sorted(task_ids_of(call)) == sorted(uploads)
        assert_all_predicted(project, backend["model_version"])
        assert {(v, 200) for v in project.upload_values.values()} <= set(upload_log_lines(ls, project.id))
    finally:
        client.set_jwt_settings(legacy_api_tokens_enabled=True)
