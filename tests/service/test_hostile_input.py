"""Bad and hostile input, through the running service (one Ray Serve app).

Every case goes over HTTP to the real deployment graph with the toy RTMDet.
Per-task cases ride in one /predict call next to good tasks, and each item
is checked on its own: a bad task gets an item with "error"/"error_reason"
and no "result" (Label Studio stores nothing and asks again later), the good
ones still get predictions. Request-level cases check the HTTP status and
the exact message. No traffic leaves 127.0.0.0/8: "remote" hosts are
loopback aliases, and the metadata address is refused before connecting.
"""
import base64
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import LABEL_CONFIG, ls_task, predict_body
from PIL import Image
from serve_fixtures import wait_ready
from toy_detector.scenes import make_scene, scene_png

import serve_app
from deployments.ingress import LabelStudioIngress
from mmdet_ls.images import DEFAULT_MAX_PIXELS, UNSUPPORTED_FORMAT_MESSAGE
from serve_app import AppArgs, build_app

pytestmark = pytest.mark.timeout(600)

API_KEY = "ls-operator-key-7f3a9c2e1d"  # the Label Studio key the backend holds
SETUP_TOKEN = "ls-setup-token-b81f04aa"  # what /setup hands over
AUTH_USER, AUTH_PASS = "labeler", "basic-pass-5c1e9d"
AUTH = (AUTH_USER, AUTH_PASS)
CANARY = "CANARY-0c9f5b7e-this-must-never-be-read"
# Short fetch limits, set the way an operator would (AppArgs in serve_config).
FETCH_LIMITS = {"fetch_connect_timeout_s": 2, "fetch_read_timeout_s": 2, "fetch_total_timeout_s": 3,
                "max_image_bytes": 16 << 20}
BODY_TIMEOUT_S = 2.0
NOT_AN_IMAGE = UNSUPPORTED_FORMAT_MESSAGE
URL_PASSWORD, URL_SIGNATURE = "hunter2-url-pass", "SIGSECRET-9d8e"  # in task URLs; never quoted back
RESPONSES: list[str] = []  # every response body of the module, searched for secrets at the end


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class _IngressWith:
    """LabelStudioIngress with extra init args (test-only knobs such as body_timeout_s)."""

    def __init__(self, deployment=LabelStudioIngress, **extra):
        self.deployment, self.extra = deployment, extra

    def options(self, **options):
        return _IngressWith(self.deployment.options(**options), **self.extra)

    def bind(self, *args, **kwargs):
        return self.deployment.bind(*args, **{**kwargs, **self.extra})


def build(args: AppArgs, **ingress_extra):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve_app, "LabelStudioIngress", _IngressWith(body_timeout_s=BODY_TIMEOUT_S, **ingress_extra))
        return build_app(args)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, image_server, ray_serve):
    tmp = tmp_path_factory.mktemp("hostile")
    # Outside image_dir: a canary the service must never read.
    (tmp / "canary-secret.txt").write_text(CANARY)
    image_dir = tmp / "media" / "upload"
    (image_dir / "1").mkdir(parents=True)
    (image_dir / "1" / "good.png").write_bytes(scene_png(700))
    os.symlink(tmp / "canary-secret.txt", image_dir / "1" / "evil.png")  # symlink out of image_dir
    os.symlink(tmp, image_dir / "1" / "outside")  # directory symlink out of image_dir
    os.mkfifo(image_dir / "1" / "fifo.png")  # opening it for reading would block forever

    web_root = tmp / "web"
    web_root.mkdir()
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    jpeg = encode(make_scene(701, 320, 240)[0], "JPEG", quality=90)
    files = {
        "good.png": scene_png(702),
        "good2.jpg": jpeg,
        "noise.png": bytes(range(256)) * 64,  # served as image/png, but not an image
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": png_header_only(50_000, 50_000),
        "zero.png": png_header_only(0, 0),
        "one.png": encode(Image.new("RGB", (1, 1), (90, 90, 90)), "PNG"),
        "wide20000.png": encode(Image.new("L", (20_000, 2), 128), "PNG"),
        "wide20001.png": encode(Image.new("L", (20_001, 2), 128), "PNG"),
        "anim.gif": gif.getvalue(),
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # Ghostscript bait
    }
    for name, data in files.items():
        (web_root / name).write_bytes(data)
    assert len(files["bomb.png"]) < 200

    ls_root = tmp / "ls"  # the fake Label Studio: serves /data/upload/5/... with any credentials
    (ls_root / "data" / "upload" / "5").mkdir(parents=True)
    (ls_root / "data" / "upload" / "5" / "remote-only.png").write_bytes(scene_png(703))

    # Secrets come from the environment of the Ray cluster (never app args):
    # set before Ray starts, so every replica inherits them.
    ls = image_server(ls_root, host="127.0.0.1")
    web = image_server(web_root, host="127.0.0.3")
    blocked = image_server(web_root, host="127.0.0.2")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LABEL_STUDIO_API_KEY", API_KEY)
        env.setenv("BASIC_AUTH_PASS", AUTH_PASS)
        args = AppArgs(
            config_file=str(TOY_CONFIG),
            checkpoint_file=str(TOY_CHECKPOINT),
            image_dir=str(image_dir),
            label_studio_url=ls.url,
            allowed_hosts=["127.0.0.3"],  # 127.0.0.2 stays blocked like any private address
            basic_auth_user=AUTH_USER,
            **FETCH_LIMITS,
        )
        url = ray_serve(build(args))
        yield {"url": url, "ls": ls, "web": web, "blocked": blocked, "image_dir": image_dir, "tmp": tmp,
               "args": args, "gif": files["anim.gif"], "jpeg": jpeg}


def post(url, path, body=None, *, raw: bytes | None = None, auth=AUTH, headers=None, timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    resp = requests.post(f"{url}{path}", data=data, auth=auth, timeout=timeout,
                         headers={"Content-Type": "application/json", **(headers or {})})
    RESPONSES.append(resp.text)
    return resp


def predict(svc, tasks, label_config=LABEL_CONFIG, **kw):
    """A /predict as Label Studio sends it, through `post` (so its answer is searched for secrets)."""
    body = predict_body(tasks, label_config=label_config, project="1.1795905333",
                        params={"login": None, "password": None, "context": None})
    return post(svc["url"], "/predict", body, **kw)


def assert_error(item, reason, message=None, *, prefix=None, retriable=None):
    assert "result" not in item, item
    assert item["error_reason"] == reason, item
    assert set(item) == {"error", "error_reason", "retriable", "model_version"}, item
    if message is not None:
        assert item["error"] == message, item
    if prefix is not None:
        assert item["error"].startswith(prefix), item
    if retriable is not None:
        assert item["retriable"] is retriable, item


def assert_prediction(item):
    assert "error" not in item and isinstance(item["result"], list), item


# ------------------------------------------------------------------ request level
def test_malformed_json_and_non_object_bodies(svc):
    url = svc["url"]
    broken = b'{"tasks": [{"data": '
    try:
        json.loads(broken)
    except json.JSONDecodeError as exc:
        expected = f"request body is not valid JSON: {exc}"
    resp = post(url, "/predict", raw=broken)
    assert resp.status_code == 400 and resp.json() == {"status": "error", "error": expected}
    for raw, kind in ((b"[1, 2]", "list"), (b'"tasks"', "str"), (b"null", "NoneType"), (b"42", "int")):
        resp = post(url, "/predict", raw=raw)
        assert resp.status_code == 400
        assert resp.json()["error"] == f"request body must be a JSON object, got {kind}"
    resp = post(url, "/predict", raw=b"")
    assert resp.status_code == 400 and resp.json()["error"] == "request body is empty; send a JSON object"
    resp = post(url, "/predict", raw=b"\xff\xfe{not utf-8")
    assert resp.status_code == 400 and resp.json()["error"].startswith("request body is not valid JSON: ")
    # Python-specific parser limits are 400s too, not 500s.
    deep = post(url, "/predict", raw=b"[" * 100_000 + b"]" * 100_000)
    assert deep.status_code == 400 and deep.json()["error"] == "request body is not valid JSON: nested too deeply"
    big_int = post(url, "/predict", raw=b'{"tasks": [], "x": ' + b"9" * 5000 + b"}")
    assert big_int.status_code == 400
    assert big_int.json()["error"].startswith("request body is not valid JSON: Exceeds the limit (4300 digits)")


def test_tasks_missing_not_a_list_or_empty(svc):
    url = svc["url"]
    for body in ({"label_config": LABEL_CONFIG}, {"tasks": {"0": {}}, "label_config": LABEL_CONFIG},
                 {"tasks": "all", "label_config": LABEL_CONFIG}, {"tasks": None, "label_config": LABEL_CONFIG}):
        resp = post(url, "/predict", body)
        assert resp.status_code == 400
        assert resp.json() == {"status": "error", "error": '"tasks" must be a list of Label Studio tasks'}
    resp = post(url, "/predict", {"tasks": [], "label_config": LABEL_CONFIG})
    assert resp.status_code == 200 and resp.json()["results"] == []


def test_ten_thousand_tasks_answered_in_order(svc):
    url, web = svc["url"], svc["web"]
    tasks = [{"id": i, "meta": {}} for i in range(10_000)]  # no "data": cheap, answered at once
    for i in (0, 500, 999):
        tasks[i] = ls_task(i, f"{web.url}/good.png")
    started = time.monotonic()
    resp = post(url, "/predict", {"tasks": tasks, "label_config": LABEL_CONFIG}, timeout=100)
    assert resp.status_code == 200 and time.monotonic() - started < 60
    results = resp.json()["results"]
    assert len(results) == 10_000
    for i in (0, 500, 999):
        assert_prediction(results[i])
    assert_error(results[1], "bad_task", 'task has no "data" object', retriable=False)
    assert all(results[i]["error_reason"] == "bad_task" for i in range(1000) if i not in (0, 500, 999))
    for item in results[1000:]:
        assert_error(item, "too_many_tasks", "one call takes 1000 tasks; ask again", retriable=True)


def test_huge_request_body_refused(svc):
    url = svc["url"]
    limit = 32 * 1024 * 1024
    message = f"request body is larger than {limit} bytes"
    # Declared too large: refused from the header, before the body is read.
    big = b'{"tasks": [], "pad": "' + b"x" * (limit + 10) + b'"}'
    resp = post(url, "/predict", raw=big, timeout=120)
    assert resp.status_code == 413 and resp.json()["error"] == message

    # Chunked (no Content-Length): counted while streaming.
    def chunks():
        yield b'{"tasks": [], "pad": "'
        for _ in range(40):
            yield b"y" * (1 << 20)
        yield b'"}'

    resp = requests.post(f"{url}/predict", data=chunks(), auth=AUTH, timeout=120)
    RESPONSES.append(resp.text)
    assert resp.status_code == 413 and resp.json()["error"] == message


def test_trickled_request_body_times_out(svc):
    host, port = svc["url"].rsplit("/", 1)[1].split(":")
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()
    marker = f"request body not received within {BODY_TIMEOUT_S:g} s".encode()
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(
            (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {token}\r\n"
             "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode() + b'{"tasks": ['
        )
        started = time.monotonic()
        answer = b""
        while marker not in answer and time.monotonic() - started < BODY_TIMEOUT_S + 15:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert marker in answer
    assert time.monotonic() - started < BODY_TIMEOUT_S + 10


def test_unusable_label_configs(svc):
    url = svc["url"]
    billion_laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="&lol3;"/></RectangleLabels></View>'
    )
    cases = {
        "this is not xml": "label config not usable: label config is not valid XML: syntax error: line 1, column 0",
        billion_laughs: "label config not usable: label config uses forbidden XML features (DTDForbidden): "
                        "DTDs and entities are not allowed",
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices>'
        "</View>": "label config not usable: label config has no <RectangleLabels>, <PolygonLabels> or <BrushLabels> "
                   "tag: this backend predicts boxes and instance masks, add e.g. <RectangleLabels name=\"label\" "
                   'toName="image"> with <Label> children',
        "<a>" * 5000 + "</a>" * 5000: "label config not usable: label config is nested too deeply",
        "<View>\ud800</View>": "label config not usable: label config is not valid text: UnicodeEncodeError",
    }
    for xml, message in cases.items():
        for path, body in (("/predict", {"tasks": [ls_task(1, "/data/upload/1/good.png")], "label_config": xml}),
                           ("/setup", {"project": "9.1", "schema": xml})):
            resp = post(url, path, body)
            assert resp.status_code == 400, (path, xml[:40], resp.text)
            assert resp.json() == {"status": "error", "error": message}, (path, resp.text)
    resp = post(url, "/predict", {"tasks": [ls_task(1, "/data/upload/1/good.png")], "project": "404.1"})
    assert resp.status_code == 400
    assert resp.json()["error"] == 'no label config: send "label_config" or call /setup for this project first'


def test_unknown_fields_are_ignored(svc):
    url = svc["url"]
    body = {
        "tasks": [{"id": 3, "data": {"image": "/data/upload/1/good.png", "caption": "x", "n": [1, {"a": None}]},
                   "surprise": {"deep": [1, 2, 3]}, "annotations": "not even a list"}],
        "label_config": LABEL_CONFIG, "project": {"id": 1}, "params": [1, 2], "future_field": {"x": 1},
    }
    resp = post(url, "/predict", body)
    assert resp.status_code == 200
    assert_prediction(resp.json()["results"][0])
    assert resp.json()["results"][0]["result"], "the toy detector finds the scene's objects"
    setup = post(url, "/setup", {"project": "12.1", "schema": LABEL_CONFIG, "hostname": "http://127.0.0.1:9",
                                 "access_token": SETUP_TOKEN, "model_version": "x", "extra_params": {"a": 1}})
    assert setup.status_code == 200 and set(setup.json()) == {"model_version"}


def test_lone_surrogates_get_an_answer_not_a_500(svc):
    raw = json.dumps({"tasks": [ls_task(1, "/data/upload/1/good.png")], "label_config": LABEL_CONFIG})
    raw = raw[:-1] + ', "extra": "\\ud800"}'
    raw = raw.replace('"tasks": [', '"tasks": [{"id": 2, "data": {"image": "http://127.0.0.3/\\udc00.png"}}, ', 1)
    resp = post(svc["url"], "/predict", raw=raw.encode())
    assert resp.status_code == 200, resp.text
    bad, good = resp.json()["results"]
    assert_error(bad, "bad_url", "URL is not valid Unicode text")
    assert_prediction(good)


# ------------------------------------------------------------------ per-task cases, one call
def test_bad_tasks_fail_alone_in_one_batch(svc):
    web, ls, blocked = svc["web"], svc["ls"], svc["blocked"]
    w = web.url
    blocked_before = len(blocked.requests)
    cases = [
        # (task or image value, expected reason, exact message or None, retriable)
        ("GOOD", "/data/upload/1/good.png"),
        ("BAD", "not a dict", "bad_task", "task must be a JSON object, got str", False),
        ("BAD", {"id": 2}, "bad_task", 'task has no "data" object', False),
        ("BAD", {"id": 3, "data": ["image"]}, "bad_task", 'task has no "data" object', False),
        ("BAD", {"id": 4, "data": {"img": "/data/upload/1/good.png"}}, "bad_task",
         'task data has no "image" key (the label config reads the image from $image)', False),
        ("BAD", {"id": 5, "data": {"image": 123}}, "bad_task",
         'task data "image" must be an image URL string, got int', False),
        ("BAD", {"id": 6, "data": {"image": None}}, "bad_task",
         'task data "image" must be an image URL string, got NoneType', False),
        ("BAD", {"id": 7, "data": {"image": {"url": "x"}}}, "bad_task",
         'task data "image" must be an image URL string, got dict', False),
        ("BAD", {"id": 8, "data": {"image": "   "}}, "bad_task",
         'task data "image" must be an image URL string, got str', False),
        ("GOOD", f"{w}/good.png"),
        ("BAD", "ftp://127.0.0.3/a.png", "bad_url",
         "unsupported URL scheme 'ftp': only http(s), Label Studio paths and data: URIs", False),
        ("BAD", "file:///etc/passwd", "bad_url",
         "unsupported URL scheme 'file': only http(s), Label Studio paths and data: URIs", False),
        ("BAD", "gopher://127.0.0.3:70/_GET", "bad_url",
         "unsupported URL scheme 'gopher': only http(s), Label Studio paths and data: URIs", False),
        ("BAD", "file:/etc/passwd", "bad_url",
         "image value 'file:/etc/passwd' is neither a URL nor a Label Studio path", False),
        ("BAD", f"{w}/status/404", "http_404", f"{w}/status/404 answered HTTP 404", False),
        ("BAD", f"{w}/status/500", "http_500", f"{w}/status/500 answered HTTP 500", True),
        ("BAD", f"{w}/redirect-loop", "redirect_loop", f"more than 5 redirects fetching {w}/redirect-loop", False),
        ("BAD", f"{w}/redirect-to/http://169.254.169.254/latest/meta-data/", "forbidden_address",
         "refused to fetch from 169.254.169.254 (169.254.169.254): link-local/cloud-metadata addresses are never "
         "fetched; list the address in allowed_hosts if this is really an image server", False),
        ("BAD", f"{w}/redirect-to/{blocked.url}/good.png", "forbidden_address",
         "refused to fetch from 127.0.0.2 (127.0.0.2): loopback addresses are blocked; set "
         "allow_private_networks: true or add the host to allowed_hosts if your images live there", False),
        ("BAD", f"{blocked.url}/good.png", "forbidden_address",
         "refused to fetch from 127.0.0.2 (127.0.0.2): loopback addresses are blocked; set "
         "allow_private_networks: true or add the host to allowed_hosts if your images live there", False),
        ("BAD", "http://169.254.169.254/latest/meta-data/iam/", "forbidden_address",
         "refused to fetch from 169.254.169.254 (169.254.169.254): link-local/cloud-metadata addresses are never "
         "fetched; list the address in allowed_hosts if this is really an image server", False),
        ("BAD", "http://[::ffff:169.254.169.254]/", "forbidden_address",
         "refused to fetch from ::ffff:a9fe:a9fe (::ffff:a9fe:a9fe): link-local/cloud-metadata "
         "addresses are never fetched; list the address in allowed_hosts if this is really an image server", False),
        ("BAD", "http://0.0.0.0:9/x.png", "forbidden_address",
         "refused to fetch from 0.0.0.0 (0.0.0.0): not a routable address", False),
        ("BAD", f"{w}/html", "not_an_image", f"expected an image but the server sent text/html: {NOT_AN_IMAGE}", False),
        ("BAD", f"{w}/trickle", "timeout", "image download took longer than 3 s", True),
        ("BAD", f"{w}/trickle-headers", "timeout", f"fetching {w}/trickle-headers took longer than 3 s", True),
        ("GOOD", f"{w}/set-cookie/good.png"),  # a cookie that must never be sent back
        ("BAD", f"{w}/huge-declared", "too_large", f"image is {1 << 30} bytes; at most {16 << 20} allowed", False),
        ("BAD", f"{w}/endless", "too_large", f"image is larger than {16 << 20} bytes", False),
        ("BAD", f"{w}/noise.png", "not_an_image", NOT_AN_IMAGE, False),
        ("BAD", f"{w}/eps.png", "not_an_image", NOT_AN_IMAGE, False),
        ("BAD", f"{w}/truncated.jpg", "not_an_image", None, False),
        ("BAD", f"{w}/bomb.png", "not_an_image",
         "image refused as a decompression bomb: Image size (2500000000 pixels) exceeds limit of "
         f"{2 * DEFAULT_MAX_PIXELS} pixels, could be decompression bomb DOS attack.", False),
        ("BAD", f"{w}/zero.png", "not_an_image", NOT_AN_IMAGE, False),
        ("GOOD", f"{w}/one.png"),
        ("BAD", f"{w}/wide20000.png", "preprocess_error", None, False),
        ("BAD", f"{w}/wide20001.png", "not_an_image", "image is 20001x2 px; the largest side allowed is 20000 px", False),
        ("GOOD", f"{w}/anim.gif"),
        ("GOOD", f"{w}/good2.jpg"),
        # Path traversal and escapes from image_dir
        ("BAD", "/data/upload/../../etc/passwd", "forbidden_path",
         "upload path '/data/upload/../../etc/passwd' leaves the upload folder", False),
        ("BAD", "/data/upload/1/..%2F..%2F..%2Fcanary-secret.txt", "forbidden_path",
         "upload path '/data/upload/1/..%2F..%2F..%2Fcanary-secret.txt' leaves the upload folder", False),
        ("BAD", "/data/upload/%2e%2e/%2e%2e/canary-secret.txt", "forbidden_path",
         "upload path '/data/upload/%2e%2e/%2e%2e/canary-secret.txt' leaves the upload folder", False),
        ("BAD", "/data/upload/1/..\\..\\..\\canary-secret.txt", "bad_url",
         "URL contains a backslash, which URL parsers read differently: "
         "'http://label-studio/data/upload/1/..\\\\..\\\\..\\\\canary-secret.txt'", False),
        ("BAD", "/data/upload//etc/passwd", "forbidden_path",
         "upload path '/data/upload//etc/passwd' leaves the upload folder", False),
        ("BAD", "/data/upload/1/good.png%00.txt", "forbidden_path",
         "upload path '/data/upload/1/good.png%00.txt' leaves the upload folder", False),
        ("BAD", f"{ls.url}/data/upload/../../../canary-secret.txt", "forbidden_path",
         f"{ls.url}/canary-secret.txt is on Label Studio but not where it serves media (/data/upload/, "
         "/data/local-files/, /storage-data/uploaded/, storage resolve): not fetched", False),
        ("BAD", "/data/upload/1/evil.png", "forbidden_path",
         "upload path '/data/upload/1/evil.png' resolves outside the upload folder", False),
        ("BAD", "/data/upload/1/outside/canary-secret.txt", "forbidden_path",
         "upload path '/data/upload/1/outside/canary-secret.txt' resolves outside the upload folder", False),
        ("BAD", "/data/upload/1/fifo.png", "forbidden_path", "upload 'fifo.png' is not a regular file", False),
        ("BAD", "/data/upload/1/", "forbidden_path", "upload '1' is not a regular file", False),
        # Double-encoding is not traversal: that name is not on disk, so Label Studio is asked (404).
        ("BAD", "/data/upload/%252e%252e/canary-secret.txt", "http_404",
         f"{ls.url}/data/upload/%252e%252e/canary-secret.txt answered HTTP 404", False),
        # Label Studio access: credentials on its host only
        ("GOOD", "/data/upload/5/remote-only.png"),
        ("BAD", "/data/upload/5/status/401", "http_401",
         f"{ls.url}/data/upload/5/status/401 answered HTTP 401 (check the Label Studio API key)", False),
        # The key never goes to Label Studio's API, relative or absolute, nor through a foreign redirect.
        ("BAD", "/api/projects/", "forbidden_path",
         f"{ls.url}/api/projects/ is on Label Studio but not where it serves media (/data/upload/, "
         "/data/local-files/, /storage-data/uploaded/, storage resolve): not fetched", False),
        ("BAD", f"{ls.url}/api/users?format=json", "forbidden_path",
         f"{ls.url}/api/users is on Label Studio but not where it serves media (/data/upload/, "
         "/data/local-files/, /storage-data/uploaded/, storage resolve): not fetched", False),
        ("BAD", f"{w}/redirect-to/{ls.url}/api/projects/", "forbidden_path",
         f"{ls.url}/api/projects/ is on Label Studio but not where it serves media (/data/upload/, "
         "/data/local-files/, /storage-data/uploaded/, storage resolve): not fetched", False),
        # Parser differential: urllib reads Label Studio's host, urllib3 the attacker's.
        ("BAD", f"http://{web.host}:{web.port}\\@{ls.host}:{ls.port}/data/upload/5/remote-only.png", "bad_url",
         f"URL contains a backslash, which URL parsers read differently: "
         f"'http://{ls.host}:{ls.port}/data/upload/5/remote-only.png'", False),
        ("BAD", f"{w}/redirect-to/http://{web.host}:{web.port}%5C@{ls.host}:{ls.port}/data/upload/5/remote-only.png",
         "bad_url", f"URL contains a backslash, which URL parsers read differently: "
         f"'http://{ls.host}:{ls.port}/data/upload/5/remote-only.png'", False),
        # userinfo and signed queries are never quoted back
        ("BAD", f"http://user:{URL_PASSWORD}@{web.host}:{web.port}/status/404?X-Amz-Signature={URL_SIGNATURE}",
         "http_404", f"{w}/status/404 answered HTTP 404", False),
        ("GOOD", f"{w}/redirect-to/{ls.url}/data/upload/5/remote-only.png"),
        ("BAD", "s3://bucket/key.png", "bad_task", "s3:// images need the task's numeric id, got '../../api/users'",
         False),
        # Other malformed values
        ("BAD", "http://127.0.0.3:99999/x.png", "bad_url",
         "URL has an invalid port: 'http://127.0.0.3:99999/x.png'", False),
        ("BAD", "http://[::1/x.png", "bad_url", "URL has a malformed IPv6 host: 'http://[::1/x.png'", False),
        ("BAD", "http://127.1/x.png", "bad_url",
         "URL has an ambiguous numeric host (write it as a.b.c.d): 'http://127.1/x.png'", False),
        ("BAD", "http://127.0.0.3/a\r\nX-Injected: 1", "bad_url",
         "URL contains control characters: 'http://127.0.0.3/a\\r\\nX-Injected: 1'", False),
        ("BAD", "http://" + "a" * 70_000, "bad_url", "image URL is longer than 64 KiB", False),
        ("BAD", "data:image/png,rawbytes", "bad_url", "data: URIs must be base64-encoded images", False),
        ("GOOD", "data:image/jpeg;base64," + base64.b64encode(svc["jpeg"]).decode()),
    ]
    tasks, expected = [], []
    for i, case in enumerate(cases):
        value = case[1]
        if isinstance(value, dict) or not isinstance(value, str) or value == "not a dict":
            tasks.append(value)
        else:
            tasks.append(ls_task(100 + i, value))
        expected.append(case)
    tasks[[c[1] for c in cases].index("s3://bucket/key.png")]["id"] = "../../api/users"

    started = time.monotonic()
    resp = predict(svc, tasks, timeout=100)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 60
    results = resp.json()["results"]
    assert len(results) == len(cases)
    for item, case in zip(results, expected):
        if case[0] == "GOOD":
            assert_prediction(item)
            continue
        _, value, reason, message, retriable = case
        assert_error(item, reason, message, retriable=retriable)
    # The ones whose text comes from Pillow/OpenCV: the start is ours, the rest theirs.
    by_value = {c[1]: r for c, r in zip(cases, results) if isinstance(c[1], str)}
    assert by_value[f"{w}/truncated.jpg"]["error"].startswith("image data is corrupt or truncated: ")
    assert by_value[f"{w}/wide20000.png"]["error"].startswith("preprocessing failed: ")
    # Real detections where there is something to see
    assert by_value["/data/upload/1/good.png"]["result"] and by_value[f"{w}/good.png"]["result"]
    assert by_value["/data/upload/5/remote-only.png"]["result"]
    # Nothing reached the blocked host, redirects included.
    assert len(blocked.requests) == blocked_before
    # Credentials: sent to Label Studio when the URL was its own, never elsewhere.
    ls_hits = [(path, headers) for path, headers in ls.requests]
    direct = [h for p, h in ls_hits if p == "/data/upload/5/remote-only.png"]
    assert any(h.get("Authorization") == f"Token {API_KEY}" for h in direct)
    assert any("Authorization" not in h for h in direct), "a foreign redirect to Label Studio got the token"
    # The only credential web ever saw: the Basic auth of its own URL's userinfo, on that URL's path.
    assert {(p.split("?")[0], h["Authorization"]) for p, h in web.requests if "Authorization" in h} == {
        ("/status/404", "Basic " + base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode())}
    assert all(h.get("Accept-Encoding") == "identity" for _, h in web.requests)
    assert not any(p.startswith("/api") for p, _ in ls.requests)
    assert all("Cookie" not in h for _, h in web.requests + ls.requests)


def test_slow_urls_hold_the_loader_no_longer_than_the_fetch_deadline(svc):
    # 64 servers trickling their headers fill every loader thread and every
    # in-flight slot; each is cut at fetch_total_timeout_s, so a good image
    # sent next waits at most about that long.
    w = svc["web"].url
    slow = threading.Thread(target=predict, args=(svc, [ls_task(i, f"{w}/trickle-headers") for i in range(64)]),
                            kwargs={"timeout": 100})
    slow.start()
    time.sleep(1.0)
    started = time.monotonic()
    # Its own task id: one task sent in two calls at once is "in_progress" in
    # the second (background completion's claims, as Label Studio tasks are).
    resp = predict(svc, [ls_task(1000, f"{w}/good.png")])
    elapsed = time.monotonic() - started
    slow.join()
    assert_prediction(resp.json()["results"][0])
    assert elapsed < FETCH_LIMITS["fetch_total_timeout_s"] + 4, elapsed


def test_setup_hostname_and_token_travel_together_and_bad_setups_store_nothing(svc):
    url, web, ls = svc["url"], svc["web"], svc["ls"]
    # A /setup naming another host: the operator's key still goes only to the
    # operator's Label Studio, and the /setup token is not sent there either.
    resp = post(url, "/setup", {"project": "9.1", "schema": LABEL_CONFIG, "hostname": web.url,
                                "access_token": SETUP_TOKEN})
    assert resp.status_code == 200, resp.text
    resp = post(url, "/predict", {"tasks": [ls_task(1, "/data/upload/5/remote-only.png")], "project": "9.1"})
    assert_prediction(resp.json()["results"][0])
    assert ls.requests[-1][1]["Authorization"] == f"Token {API_KEY}"
    assert not any(API_KEY in str(h) or SETUP_TOKEN in str(h) for _, h in web.requests)
    bad = [
        ("javascript:alert(1)", "t0ken"),
        (f"http://{web.host}:{web.port}\\@{ls.host}:{ls.port}", "t0ken"),
        ("http://" + "a" * 3000 + ".com", "t0ken"),
        (ls.url, "tok\r\nX-Injected: 1"),
        (ls.url, "x" * 5000),
        (123, "t0ken"),
        (None, "t0ken"),
    ]
    for hostname, token in bad:
        resp = post(url, "/setup", {"project": "77.1", "schema": LABEL_CONFIG, "hostname": hostname,
                                    "access_token": token})
        assert resp.status_code == 400, (hostname, resp.text)
    resp = post(url, "/predict", {"tasks": [ls_task(1, f"{web.url}/good.png")], "project": "77.1"})
    assert resp.status_code == 400 and "no label config" in resp.json()["error"]


def test_no_file_outside_image_dir_is_ever_read(svc):
    # Self-contained (not relying on responses of earlier tests): every way
    # out of image_dir, then the canary's content must show up nowhere, not
    # in a response and not in a log line of this Ray session.
    assert (svc["tmp"] / "canary-secret.txt").read_text() == CANARY  # it is there to be read
    ls = svc["ls"].url
    escapes = ["/data/upload/../../canary-secret.txt", "/data/upload/1/..%2F..%2F..%2Fcanary-secret.txt",
               "/data/upload/%2e%2e/%2e%2e/canary-secret.txt", "/data/upload/1/evil.png",
               "/data/upload/1/outside/canary-secret.txt", f"{ls}/data/upload/1/evil.png",
               f"{ls}/data/upload/1/..%2F..%2F..%2Fcanary-secret.txt", "/data/upload/1/..\\..\\canary-secret.txt"]
    resp = predict(svc, [ls_task(i, value) for i, value in enumerate(escapes)])
    results = resp.json()["results"]
    assert len(results) == len(escapes)
    for value, item in zip(escapes, results):
        assert "result" not in item and item["error_reason"] in ("forbidden_path", "bad_url", "http_404"), (value, item)
    assert not any(CANARY in text for text in RESPONSES)
    assert CANARY not in "\n".join(read_session_logs())


# ------------------------------------------------------------------ access control and secrets
def test_basic_auth_guards_everything_but_health(svc):
    url = svc["url"]
    assert requests.get(f"{url}/health", timeout=2).status_code == 200
    assert requests.get(f"{url}/", timeout=2).status_code == 200
    bad_headers = [
        None,
        {"Authorization": "Basic " + base64.b64encode(b"labeler:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"someone:" + AUTH_PASS.encode()).decode()},
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Basic " + base64.b64encode("labeler:pässwörd".encode()).decode()},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode()},
        {"Authorization": "Bearer " + AUTH_PASS},
        {"Authorization": "Basic"},
    ]
    for headers in bad_headers:
        for method, path in (("post", "/predict"), ("post", "/setup"), ("post", "/webhook"), ("get", "/metrics")):
            resp = requests.request(method, f"{url}{path}", json={"tasks": []}, headers=headers, timeout=10)
            RESPONSES.append(resp.text)
            assert resp.status_code == 401, (path, headers, resp.status_code)
            assert resp.json() == {"status": "error", "error": "authentication required"}
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="mmdet-backend"'
    # Non-latin-1 bytes in the header itself (sent raw): still a 401, not a 500.
    raw = requests.post(f"{url}/predict", data=b"{}", timeout=10,
                        headers={"Authorization": "Basic \xe9\xe9\xe9".encode("latin-1")})
    assert raw.status_code == 401
    ok = requests.post(f"{url}/webhook", json={"action": "PING"}, auth=AUTH, timeout=10)
    assert ok.status_code == 200


def read_session_logs() -> list[str]:
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None) or ray._private.worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs"
    texts = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ""):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                pass
    return texts


def test_secrets_never_in_responses_logs_or_metrics(svc):
    url, web = svc["url"], svc["web"]
    # Every secret is really used here, whatever ran before: the key (once
    # refused), a /setup token, a URL password and a signed query, and a
    # server setting a cookie before a second fetch from it.
    resp = post(url, "/setup", {"project": "31.1", "schema": LABEL_CONFIG, "hostname": web.url,
                                "access_token": SETUP_TOKEN})
    assert resp.status_code == 200
    signed = f"http://user:{URL_PASSWORD}@{web.host}:{web.port}/status/404?X-Amz-Signature={URL_SIGNATURE}"
    resp = predict(svc, [ls_task(1, "/data/upload/5/status/403"), ls_task(2, "/data/upload/5/remote-only.png"),
                         ls_task(3, signed), ls_task(4, f"{web.url}/set-cookie/good.png")])
    results = resp.json()["results"]
    assert_error(results[0], "http_403",
                 f"{svc['ls'].url}/data/upload/5/status/403 answered HTTP 403 (check the Label Studio API key)")
    assert_prediction(results[1])
    assert_error(results[2], "http_404", f"{web.url}/status/404 answered HTTP 404")
    assert_prediction(results[3])
    assert_prediction(predict(svc, [ls_task(5, f"{web.url}/good.png")]).json()["results"][0])
    assert any(p == "/good.png" for p, _ in web.requests) and any(p.startswith("/set-cookie/") for p, _ in web.requests)
    metrics_text = requests.get(f"{url}/metrics", auth=AUTH, timeout=30).text
    logs = read_session_logs()
    assert any("ServeReplica" in t or "replica" in t.lower() for t in logs), "no Serve logs found"
    serve_logs = [t for t in logs if "serve" in t.lower()]
    assert serve_logs
    # What Ray shows operators (`serve status`, `serve config` and the dashboard's Serve page).
    from ray import serve
    from ray.serve.context import _get_global_client

    shown = repr(serve.status()) + json.dumps(_get_global_client().get_serve_details(), default=str)
    assert "mmdet-backend" in shown and "LabelStudioIngress" in shown  # the real app's details
    secrets = (API_KEY, SETUP_TOKEN, AUTH_PASS, URL_PASSWORD, URL_SIGNATURE,
               base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode())
    for secret in secrets:
        assert secret not in shown, secret
    assert all("Cookie" not in h for _, h in svc["web"].requests)
    for secret in secrets:
        assert not any(secret in text for text in RESPONSES), secret
        assert secret not in metrics_text, secret
        leaks = [t for t in logs if secret in t]
        assert not leaks, f"{secret} found in a log: {leaks[0][:300]}"


def test_health_can_require_auth_when_configured(svc):
    from ray import serve

    url = svc["url"]
    serve.run(build(svc["args"], health_requires_auth=True), name="mmdet-backend", route_prefix="/")
    try:
        assert requests.get(f"{url}/health", timeout=5).status_code == 401
        assert requests.get(f"{url}/health", auth=AUTH, timeout=5).json()["status"] == "UP"
    finally:
        serve.run(build(svc["args"]), name="mmdet-backend", route_prefix="/")
    wait_ready(url, 60)
