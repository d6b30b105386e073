"""A local HTTP server for test and bench images, with misbehaving routes.

Serves files from a directory on 127.0.0.1 (or another loopback address) in
a background thread, optionally adding a fixed latency per image.
"""
from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "test-images/1"

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv: ImageServer = self.server.owner  # type: ignore[attr-defined]
        srv.requests.append((self.path, dict(self.headers)))
        path = urlsplit(self.path).path
        if path.startswith("/status/") or "/status/" in path:  # also under a media path, e.g. /data/upload/5/status/401
            return self._send(int(path.rsplit("/", 1)[1]), b"error page", "text/html")
        if path == "/redirect-loop":
            return self._send(302, b"", headers={"Location": "/redirect-loop"})
        if path.startswith("/redirect-to/"):
            # Percent-decoded, so a test can make the Location carry what a URL may not (e.g. a backslash).
            return self._send(302, b"", headers={"Location": unquote(path[len("/redirect-to/"):]) or "/"})
        if path == "/html":
            return self._send(200, b"<html><body>login page</body></html>", "text/html; charset=utf-8")
        if path == "/trickle":  # slow-loris: one byte every 0.5 s, forever
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not srv.stopping.is_set():
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.5)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if path == "/endless":  # no Content-Length, never-ending body
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                while not srv.stopping.is_set():
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if path == "/trickle-headers":  # slow-loris in the headers: a header byte every 0.5 s, forever
            self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            try:
                while not srv.stopping.is_set():
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.5)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if path.startswith("/set-cookie/"):  # a server handing out a session cookie with an image
            file = (srv.root / path[len("/set-cookie/"):]).resolve()
            return self._send(200, file.read_bytes(), "image/png", headers={"Set-Cookie": "sessionid=COOKIE-1f2e; Path=/"})
        if path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            return
        file = (srv.root / path.lstrip("/")).resolve()
        if srv.root not in file.parents or not file.is_file():
            return self._send(404, b"not found", "text/plain")
        if srv.latency_s:
            time.sleep(srv.latency_s)
        ctype = "image/jpeg" if file.suffix.lower() in (".jpg", ".jpeg") else "image/png"
        return self._send(200, file.read_bytes(), ctype)


def _post(self):
    srv: ImageServer = self.server.owner  # type: ignore[attr-defined]
    length = int(self.headers.get("Content-Length") or 0)
    body = self.rfile.read(length)
    srv.requests.append((self.path, dict(self.headers)))
    handler = srv.post_handlers.get(urlsplit(self.path).path)
    if handler is None:
        return self._send(404, b"not found", "text/plain")
    status, payload, headers = handler(body)
    return self._send(status, payload, "application/json", headers=headers)


_Handler.do_POST = _post


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


class ImageServer:
    def __init__(self, root: str | Path, host: str = "127.0.0.1", latency_s: float = 0.0, port: int = 0):
        self.root = Path(root).resolve()
        self.latency_s = latency_s
        self.requests: list = []
        self.post_handlers: dict = {}  # path -> f(body) -> (status, body bytes, headers)
        self.stopping = threading.Event()
        self._httpd = _ThreadingServer((host, port), _Handler)
        self._httpd.owner = self
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
