"""Checkpoint downloads against real HTTP servers on 127.0.0.1 (no internet):
sha256 checks, no partial or non-checkpoint files in the cache, the network
policy on every redirect hop, credentials only to their own origin, redacted
messages and logs, and one deadline for the whole download."""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import logging
import os
import pickle
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from mmdet_ls.model_files import ModelFileError, cached_checkpoint_path, resolve_checkpoint_file


def zip_checkpoint(size: int = 200_000, seed: bytes = b"w") -> bytes:
    """Bytes shaped like torch.save's output: a complete zip archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}, protocol=2))
        zf.writestr("archive/data/0", hashlib.sha256(seed).digest() * (size // 32))
    return buf.getvalue()


def pickle_checkpoint(size: int = 200_000) -> bytes:
    """Bytes shaped like a legacy torch.save: a pickle (0x80, protocol >= 2)."""
    return pickle.dumps({"state_dict": b"\1" * size}, protocol=2)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zoo_name(data: bytes, stem: str = "faster_rcnn_r50_fpn_1x_coco_20200130") -> str:
    return f"{stem}-{sha256(data)[:8]}.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server: Server = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        server.requests.append((path, dict(self.headers)))
        route = server.routes.get(path)
        if route is None:
            return self.send_body(404, b"<html>not found</html>", "text/html")
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_body(self, status: int, body: bytes, content_type: str = "application/octet-stream", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def redirect(self, location: str, status: int = 302):
        self.send_body(status, b"", headers={"Location": location})

    def die(self):
        """Drop the connection at once, as a crashing server would."""
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True


class Server:
    """http.server in a thread; `routes` maps a path to a handler function."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list[tuple[str, dict]] = []
        self.stopping = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, userinfo: str = "", query: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}{path}{'?' + query if query else ''}"

    def serve_file(self, path: str, body: bytes, content_type: str = "application/octet-stream"):
        self.routes[path] = lambda h: h.send_body(200, body, content_type)

    def hits(self, path: str) -> int:
        return sum(p == path for p, _ in self.requests)

    def close(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def outside_connections(monkeypatch):
    """No test here connects beyond 127.0.0.1: any other connect is recorded and
    fails, so a refused address is shown to be refused before connecting."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            attempts.append(address)
            raise OSError(101, "test guard: network is unreachable")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def servers():
    started: list[Server] = []

    def start() -> Server:
        started.append(Server())
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def server(servers):
    return servers()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("MODEL_DIR", str(folder))
    return folder


def cache_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- sha256 ----------------------------------------------------------------


def test_sha_mismatch_with_the_zoo_name_is_refused_and_nothing_cached(server, cache):
    body = zip_checkpoint()
    assert not sha256(body).startswith("047c8118")
    server.serve_file("/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth", body)
    with pytest.raises(ModelFileError, match="sha256") as err:
        resolve_checkpoint_file(server.url("/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"))
    assert "047c8118" in str(err.value) and sha256(body) in str(err.value)
    assert cache_files(cache) == []


def test_name_hash_is_verified_and_the_cached_file_is_checked_again(server, cache):
    body = zip_checkpoint()
    path = "/" + zoo_name(body)
    server.serve_file(path, body)
    url = server.url(path)
    local = resolve_checkpoint_file(url)
    assert Path(local).read_bytes() == body and server.hits(path) == 1
    assert resolve_checkpoint_file(url) == local and server.hits(path) == 1  # cached, not fetched again
    with open(local, "r+b") as f:  # the cached copy gets damaged (disk, a bad copy, tampering)
        f.seek(len(body) // 2)
        f.write(b"\0\0\0\0")
    assert resolve_checkpoint_file(url) == local
    assert Path(local).read_bytes() == body and server.hits(path) == 2  # re-verified, so fetched again
    assert cache_files(cache) == [os.path.basename(local)]


def test_configured_digest_wins_over_the_name(server, cache):
    body = zip_checkpoint()
    other = zip_checkpoint(seed=b"other")
    # The name's prefix is wrong, the configured full digest is right: accepted.
    server.serve_file("/model_2020-00000000.pth", body)
    local = resolve_checkpoint_file(server.url("/model_2020-00000000.pth"), checkpoint_sha256=sha256(body).upper())
    assert Path(local).read_bytes() == body
    # The name's prefix is right, the configured digest is not: refused, not cached.
    name = "/" + zoo_name(other, "other")
    server.serve_file(name, other)
    with pytest.raises(ModelFileError, match="checkpoint_sha256"):
        resolve_checkpoint_file(server.url(name), checkpoint_sha256=sha256(body))
    assert cache_files(cache) == [os.path.basename(local)]
    # A name without a hash is checked against the configured digest too.
    server.serve_file("/plain.pth", other)
    with pytest.raises(ModelFileError, match="does not match"):
        resolve_checkpoint_file(server.url("/plain.pth"), checkpoint_sha256=sha256(body))
    with pytest.raises(ModelFileError, match="64 hex digits"):
        resolve_checkpoint_file(server.url("/plain.pth"), checkpoint_sha256="047c8118")
    assert cache_files(cache) == [os.path.basename(local)]


# --- only checkpoints, never partial files ---------------------------------


@pytest.mark.parametrize(
    "content_type, body, says",
    [
        ("text/html; charset=utf-8", b"<!doctype html><html><body>Sign in</body></html>", "text/html"),
        ("application/octet-stream", b"Access denied\n", "application/octet-stream"),
        ("application/json", b"", "0 bytes of application/json"),
    ],
)
def test_a_page_that_is_not_a_checkpoint_is_refused_and_not_cached(server, cache, content_type, body, says):
    server.serve_file("/model.pth", body, content_type)
    with pytest.raises(ModelFileError, match="not a checkpoint") as err:
        resolve_checkpoint_file(server.url("/model.pth"))
    assert f"the server sent {says}" in str(err.value)
    assert cache_files(cache) == []


def test_an_http_error_is_refused_and_not_cached(server, cache):
    server.routes["/model.pth"] = lambda h: h.send_body(403, b"<html>forbidden</html>", "text/html")
    with pytest.raises(ModelFileError, match="HTTP 403"):
        resolve_checkpoint_file(server.url("/model.pth"))
    assert cache_files(cache) == []


def _die_mid_body(body: bytes, chunked: bool):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        half = body[: len(body) // 2]
        h.wfile.write(b"%x\r\n" % len(body) + half if chunked else half)
        h.die()

    return route


@pytest.mark.parametrize(
    "body, chunked",
    [
        pytest.param(pickle_checkpoint(), True, id="chunked-pickle"),
        pytest.param(zip_checkpoint(), False, id="zip-with-content-length"),
        pytest.param(pickle_checkpoint(), False, id="pickle-with-content-length"),
    ],
)
def test_server_dying_mid_body_leaves_no_partial_file(server, cache, body, chunked):
    server.routes["/model.pth"] = _die_mid_body(body, chunked)
    with pytest.raises(ModelFileError):
        resolve_checkpoint_file(server.url("/model.pth"))
    assert cache_files(cache) == []


def test_download_is_capped_at_max_bytes(server, cache):
    body = zip_checkpoint()
    server.serve_file("/model.pth", body)

    def no_length(h):
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True

    server.routes["/no-length.pth"] = no_length
    for path in ("/model.pth", "/no-length.pth"):
        with pytest.raises(ModelFileError, match="at most 1000|larger than 1000"):
            resolve_checkpoint_file(server.url(path), max_bytes=1000)
    assert cache_files(cache) == []


def test_old_cached_page_is_replaced(server, cache):
    """A web page cached as a checkpoint (by an older version) is fetched again."""
    body = pickle_checkpoint()
    server.serve_file("/model.pth", body)
    url = server.url("/model.pth")
    cached_checkpoint_path(url).write_bytes(b"<html>login</html>")
    assert Path(resolve_checkpoint_file(url)).read_bytes() == body
    assert server.hits("/model.pth") == 1


def test_download_does_not_use_requests(server, cache, monkeypatch):
    body = zip_checkpoint()
    server.serve_file("/model.pth", body)
    monkeypatch.setitem(sys.modules, "requests", None)  # `import requests` fails
    assert Path(resolve_checkpoint_file(server.url("/model.pth"))).read_bytes() == body


# --- network policy and credentials ----------------------------------------


@pytest.mark.parametrize("redirected", [True, False])
def test_metadata_address_is_refused_even_after_a_redirect(server, cache, outside_connections, redirected):
    metadata = "http://169.254.169.254/latest/meta-data/model.pth"
    server.routes["/model.pth"] = lambda h: h.redirect(metadata)
    with pytest.raises(ModelFileError, match="link-local/cloud-metadata addresses are never fetched") as err:
        resolve_checkpoint_file(server.url("/model.pth") if redirected else metadata)
    assert "169.254.169.254" in str(err.value)
    assert outside_connections == [], "refused before connecting"
    assert cache_files(cache) == []


def test_private_addresses_are_allowed(server, cache):
    """The operator chose the URL: loopback/private hosts are fine (127.0.0.1 here)."""
    body = zip_checkpoint()
    server.serve_file("/model.pth", body)
    assert Path(resolve_checkpoint_file(server.url("/model.pth"))).read_bytes() == body


def test_userinfo_goes_only_to_its_own_origin(servers, cache, caplog):
    caplog.set_level(logging.DEBUG)
    origin, other = servers(), servers()  # same host, another port: another origin
    body = zip_checkpoint()
    expected = "Basic " + base64.b64encode(b"ann:s3cr:et").decode()

    def protected(h):
        if h.headers.get("Authorization") != expected:
            return h.send_body(401, b"who are you?", "text/plain")
        h.redirect(other.url("/model.pth"))

    origin.routes["/start.pth"] = lambda h: h.redirect("/protected.pth")  # same origin: keeps the credentials
    origin.routes["/protected.pth"] = protected
    other.serve_file("/model.pth", body)

    local = resolve_checkpoint_file(origin.url("/start.pth", userinfo="ann:s3cr%3Aet"))
    assert Path(local).read_bytes() == body
    assert [h.get("Authorization") for _, h in origin.requests] == [expected, expected]
    assert [p for p, _ in other.requests] == ["/model.pth"]
    assert all("Authorization" not in h for _, h in other.requests)
    assert not any("s3cr" in r.getMessage() for r in caplog.records)


def test_userinfo_is_not_sent_back_to_the_origin_after_leaving_it(servers, cache):
    origin, other = servers(), servers()
    body = zip_checkpoint()
    origin.routes["/start.pth"] = lambda h: h.redirect(other.url("/bounce.pth"))
    other.routes["/bounce.pth"] = lambda h: h.redirect(origin.url("/model.pth"))
    origin.serve_file("/model.pth", body)
    resolve_checkpoint_file(origin.url("/start.pth", userinfo="ann:s3cret"))
    auth = {p: h.get("Authorization") for p, h in origin.requests + other.requests}
    assert auth["/start.pth"] and auth["/bounce.pth"] is None and auth["/model.pth"] is None


# --- messages and logs -----------------------------------------------------

SECRETS = ("s3cret", "sig0123", "ann:")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scenario", ["refused", "404", "html", "sha", "metadata", "mid-body", "ok"])
def test_messages_and_logs_never_show_userinfo_query_or_absolute_paths(
    server, tmp_path, monkeypatch, caplog, scenario
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    body = zip_checkpoint()
    path = "/" + zoo_name(b"something else")
    routes = {
        "404": lambda h: h.send_body(404, b"nope", "text/plain"),
        "html": lambda h: h.send_body(200, b"<html>login</html>", "text/html"),
        "sha": lambda h: h.send_body(200, body),
        "metadata": lambda h: h.redirect("http://ann:s3cret@169.254.169.254/x.pth?sig0123"),
        "mid-body": _die_mid_body(pickle_checkpoint(), chunked=True),
        "ok": lambda h: h.send_body(200, body),
    }
    if scenario in routes:
        server.routes[path] = routes[scenario]
    url = server.url(path, userinfo="ann:s3cret", query="X-Amz-Signature=sig0123")
    if scenario == "refused":
        url = f"http://ann:s3cret@127.0.0.1:{_closed_port()}{path}?X-Amz-Signature=sig0123"
    kw = {"checkpoint_sha256": sha256(body)} if scenario == "ok" else {}
    messages = [r.getMessage() for r in caplog.records]
    try:
        local = resolve_checkpoint_file(url, **kw)
    except ModelFileError as exc:
        assert scenario != "ok", exc
        message = str(exc)
        assert "127.0.0.1" in message  # the URL is still named, redacted
        if scenario == "refused":
            assert "set checkpoint_file to its local path" in message
            assert "~/.cache/mmdet-ls-backend/checkpoints" in message
        messages.append(message)
    else:
        assert scenario == "ok"
        assert Path(local).read_bytes() == body
    messages += [r.getMessage() for r in caplog.records]
    for text in messages:
        assert not any(secret in text for secret in SECRETS), text
        assert str(tmp_path) not in text, text
    assert any("downloading checkpoint" in m for m in messages)


def test_cache_outside_home_is_named_by_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelFileError) as err:
        resolve_checkpoint_file(f"http://127.0.0.1:{_closed_port()}/model.pth", timeout_s=5)
    assert "$MODEL_DIR" in str(err.value) and str(tmp_path) not in str(err.value)


# --- one deadline ----------------------------------------------------------


TRICKLE_S = 6  # how long the trickling servers go on (a client without a deadline waits it out)


def _trickle_body(h):
    h.send_response(200)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(10 << 20))
    h.end_headers()
    h.wfile.write(b"PK\x03\x04")
    until = time.monotonic() + TRICKLE_S
    while time.monotonic() < until and not h.server.owner.stopping.is_set():
        h.wfile.write(b"\0")
        h.wfile.flush()
        time.sleep(0.05)
    h.die()


def _trickle_headers(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(int(TRICKLE_S / 0.05)):
        if h.server.owner.stopping.is_set():
            return
        h.wfile.write(b"X-Slow-%d: 1\r\n" % i)
        h.wfile.flush()
        time.sleep(0.05)


@pytest.mark.parametrize("route", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_a_trickling_server_is_cut_at_the_deadline(server, cache, route):
    server.routes["/model.pth"] = route
    started = time.monotonic()
    with pytest.raises(ModelFileError, match="longer than 1.5 s"):
        resolve_checkpoint_file(server.url("/model.pth"), timeout_s=1.5)
    assert time.monotonic() - started < 4
    assert cache_files(cache) == []
