import base64
import io
import json
import os
import socket
import threading
import time

import pytest
from image_server import ImageServer
from PIL import Image

from mmdet_ls.failures import TaskError
from mmdet_ls.http_fetch import CancelToken
from mmdet_ls.image_sources import FetchLimits, LabelStudioAccess, LabelStudioAuth, fetch_image_bytes
from mmdet_ls.network_policy import NetworkPolicy, classify_address

LOOPBACK_OK = NetworkPolicy(allowed_hosts=("127.0.0.1",))


def png_bytes(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def upload_dir(tmp_path):
    root = tmp_path / "media" / "upload"
    (root / "3").mkdir(parents=True)
    (root / "3" / "abc-photo.png").write_bytes(png_bytes())
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", root / "3" / "link.png")
    return root


def fetch(value, image_dir, limits=FetchLimits(), policy=LOOPBACK_OK, access=None, **kw):
    auth = LabelStudioAuth(access, limits, policy) if access is not None and access.api_key else None
    return fetch_image_bytes(value, image_dir=str(image_dir), limits=limits, policy=policy, access=access,
                             auth=auth, **kw)


def test_upload_read_from_image_dir(upload_dir):
    got = fetch("/data/upload/3/abc-photo.png", upload_dir)
    assert got.source == "local" and got.data == png_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/../../secret.txt",
        "/data/upload/3/..%2F..%2Fsecret.txt",
        "/data/upload/%2e%2e/%2e%2e/secret.txt",
        "/data/upload//etc/passwd",
        "/data/upload/3/link.png",  # symlink out of image_dir
    ],
)
def test_paths_leaving_image_dir_are_refused(upload_dir, path):
    with pytest.raises(TaskError) as err:
        fetch(path, upload_dir)
    assert err.value.failure.reason == "forbidden_path"


def test_relative_path_without_label_studio_url_says_what_to_set(upload_dir):
    with pytest.raises(TaskError, match="set LABEL_STUDIO_URL"):
        fetch("/data/upload/3/missing.png", upload_dir)


def test_unknown_schemes_refused(upload_dir):
    for url in ("ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/"):
        with pytest.raises(TaskError) as err:
            fetch(url, upload_dir)
        assert err.value.failure.reason == "bad_url"


def test_http_fetch_and_failures(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    limits = FetchLimits(connect_timeout_s=1, read_timeout_s=1, total_timeout_s=2, max_bytes=1_000_000, max_redirects=3)
    with ImageServer(tmp_path) as srv:
        assert fetch(f"{srv.url}/a.png", upload_dir, limits).data == png_bytes()
        cases = {
            "/status/404": "http_404",
            "/status/500": "http_500",
            "/redirect-loop": "redirect_loop",
            "/trickle": "timeout",
            "/endless": "too_large",
            "/huge-declared": "too_large",
        }
        for path, reason in cases.items():
            with pytest.raises(TaskError) as err:
                fetch(srv.url + path, upload_dir, limits)
            assert err.value.failure.reason == reason, path


def test_label_studio_credentials_only_go_to_label_studio(tmp_path, upload_dir):
    (tmp_path / "data" / "upload" / "3").mkdir(parents=True)
    (tmp_path / "data" / "upload" / "3" / "x.png").write_bytes(png_bytes())
    (tmp_path / "a.png").write_bytes(png_bytes())
    policy = NetworkPolicy(allowed_hosts=("127.0.0.3",))
    with ImageServer(tmp_path) as ls, ImageServer(tmp_path, host="127.0.0.3") as other:
        access = LabelStudioAccess.from_text(ls.url, "0123456789abcdef")
        got = fetch("/data/upload/3/x.png", tmp_path / "empty", access=access, policy=policy)
        assert got.source == "label_studio"
        assert ls.requests[-1][1]["Authorization"] == "Token 0123456789abcdef"
        fetch(f"{other.url}/a.png", upload_dir, access=access, policy=policy)
        assert "Authorization" not in other.requests[-1][1]


def test_backslash_trick_neither_sends_the_key_nor_connects_elsewhere(tmp_path):
    # urllib reads the host after the "@" (Label Studio), requests/urllib3
    # before the backslash (the attacker): refused before anything is sent.
    (tmp_path / "data" / "upload" / "3").mkdir(parents=True)
    (tmp_path / "data" / "upload" / "3" / "x.png").write_bytes(png_bytes())
    policy = NetworkPolicy(allowed_hosts=("127.0.0.3", "127.0.0.4"))
    with ImageServer(tmp_path) as ls, ImageServer(tmp_path, host="127.0.0.3") as attacker, \
            ImageServer(tmp_path, host="127.0.0.4") as relay:
        access = LabelStudioAccess.from_text(ls.url, "0123456789abcdef")
        trick = f"http://{attacker.host}:{attacker.port}\\@{ls.host}:{ls.port}/data/upload/3/x.png"
        # In the task itself, and in a redirect's Location (the relay decodes %5C into a backslash).
        for value in (trick, f"{relay.url}/redirect-to/{trick.replace(chr(92), '%5C')}"):
            with pytest.raises(TaskError, match="backslash") as err:
                fetch(value, tmp_path / "empty", access=access, policy=policy)
            assert err.value.failure.reason == "bad_url"
        assert len(relay.requests) == 1  # the redirect was read, and refused
        assert attacker.requests == []
        assert ls.requests == []


def test_label_studio_api_and_other_paths_never_get_the_key(tmp_path):
    (tmp_path / "api" / "projects").mkdir(parents=True)
    (tmp_path / "api" / "projects" / "index.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as ls:
        access = LabelStudioAccess.from_text(ls.url, "0123456789abcdef")
        for value in ("/api/projects/index.png", f"{ls.url}/api/projects/index.png", "/data/upload/%2e%2e/api/x.png",
                      "/data/upload/1%2F..%2F..%2Fapi/x.png", "/static/x.png", "/tasks/1/presign/../../api/x"):
            with pytest.raises(TaskError) as err:
                fetch(value, tmp_path / "empty", access=access)
            assert err.value.failure.reason == "forbidden_path", (value, err.value.failure)
        # A foreign server redirecting into Label Studio's API is refused too.
        with ImageServer(tmp_path, host="127.0.0.3") as other:
            with pytest.raises(TaskError) as err:
                fetch(f"{other.url}/redirect-to/{ls.url}/api/projects/index.png", tmp_path / "empty", access=access,
                      policy=NetworkPolicy(allowed_hosts=("127.0.0.3",)))
            assert err.value.failure.reason == "forbidden_path"
        assert ls.requests == []


def test_connection_goes_to_the_address_that_was_checked(tmp_path, monkeypatch):
    # DNS rebinding: the first answer is an allowed host, every later one a
    # blocked one. One lookup per hop, and the socket connects to its answer.
    (tmp_path / "a.png").write_bytes(png_bytes())
    real = socket.getaddrinfo
    calls = []

    with ImageServer(tmp_path, host="127.0.0.3") as allowed, \
            ImageServer(tmp_path, host="127.0.0.2", port=allowed.port) as blocked:
        def rebinding(host, port, *args, **kw):
            if host == "images.test":
                calls.append(host)
                ip = "127.0.0.3" if len(calls) == 1 else "127.0.0.2"
                return real(ip, port, *args, **kw)
            return real(host, port, *args, **kw)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        got = fetch(f"http://images.test:{allowed.port}/a.png", tmp_path, policy=NetworkPolicy(allowed_hosts=("127.0.0.3",)))
        assert got.data == png_bytes()
        assert len(calls) == 1 and len(allowed.requests) == 1 and blocked.requests == []


def test_trickled_headers_are_cut_at_the_total_deadline(tmp_path, upload_dir):
    limits = FetchLimits(connect_timeout_s=1, read_timeout_s=2, total_timeout_s=1.5)
    with ImageServer(tmp_path) as srv:
        started = time.monotonic()
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/trickle-headers", upload_dir, limits)
        assert err.value.failure.reason == "timeout"
        assert time.monotonic() - started < 2.5


def test_cancel_frees_the_thread_at_once(tmp_path, upload_dir):
    limits = FetchLimits(total_timeout_s=30)
    token = CancelToken()
    with ImageServer(tmp_path) as srv:
        threading.Timer(0.5, token.cancel).start()
        started = time.monotonic()
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/trickle-headers", upload_dir, limits, cancel=token)
        assert err.value.failure.reason == "cancelled"
        assert time.monotonic() - started < 2


def test_cookies_are_never_replayed(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as srv:
        fetch(f"{srv.url}/set-cookie/a.png", upload_dir)
        fetch(f"{srv.url}/a.png", upload_dir)
        assert all("Cookie" not in h for _, h in srv.requests)


def test_url_userinfo_goes_to_its_own_origin_only_and_never_into_messages(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as srv, ImageServer(tmp_path, host="127.0.0.3") as other:
        policy = NetworkPolicy(allowed_hosts=("127.0.0.1", "127.0.0.3"))
        fetch(f"http://me:pw@{srv.host}:{srv.port}/redirect-to/{other.url}/a.png", upload_dir, policy=policy)
        assert srv.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(b"me:pw").decode()
        assert "Authorization" not in other.requests[-1][1]
        with pytest.raises(TaskError) as err:
            fetch(f"http://me:pw@{srv.host}:{srv.port}/status/404?X-Amz-Signature=SIG", upload_dir, policy=policy)
        assert "pw" not in err.value.failure.message and "SIG" not in err.value.failure.message
        # On Label Studio's own origin, userinfo is refused outright.
        with pytest.raises(TaskError) as err:
            fetch(f"http://me:pw@{srv.host}:{srv.port}/data/upload/1/a.png", upload_dir,
                  access=LabelStudioAccess.from_text(srv.url, "k"))
        assert err.value.failure.reason == "bad_url"


def test_messages_never_show_image_dir(upload_dir):
    with pytest.raises(TaskError) as err:
        fetch("/data/upload/3/missing.png", upload_dir)
    assert str(upload_dir) not in err.value.failure.message and "/tmp" not in err.value.failure.message


def _token_server(tmp_path, handler):
    srv = ImageServer(tmp_path)
    srv.post_handlers["/api/token/refresh/"] = handler
    return srv


def _jwt(payload: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256'})}.{enc(payload)}.sig"


@pytest.mark.parametrize(
    "answer, detail",
    [
        ((302, b"", {"Location": "http://127.0.0.3/steal"}), "HTTP 302"),  # no redirect followed
        ((200, json.dumps({"access": "x" * 5000}).encode(), None), "usable access token"),
        ((200, json.dumps({"access": "a\r\nX-Evil: 1"}).encode(), None), "usable access token"),
        ((200, b"{" + b" " * 20000 + b"}", None), "at most 8192 allowed"),
    ],
)
def test_token_exchange_is_one_small_hop(tmp_path, answer, detail):
    refresh = _jwt({"token_type": "refresh", "exp": time.time() + 3600})
    with _token_server(tmp_path, lambda body: answer) as ls, ImageServer(tmp_path, host="127.0.0.3") as elsewhere:
        access = LabelStudioAccess.from_text(ls.url, refresh)
        auth = LabelStudioAuth(access, FetchLimits(), LOOPBACK_OK)
        with pytest.raises(TaskError) as err:
            auth.headers()
        assert err.value.failure.reason == "label_studio_auth"
        assert detail in err.value.failure.message
        assert elsewhere.requests == []
        assert ls.requests[-1][1].get("Accept-Encoding") == "identity"


def test_token_exchange_gives_a_bearer(tmp_path):
    refresh = _jwt({"token_type": "refresh"})
    access_token = _jwt({"token_type": "access", "exp": time.time() + 300})
    with _token_server(tmp_path, lambda body: (200, json.dumps({"access": access_token}).encode(), None)) as ls:
        auth = LabelStudioAuth(LabelStudioAccess.from_text(ls.url, refresh), FetchLimits(), LOOPBACK_OK)
        assert auth.headers() == {"Authorization": f"Bearer {access_token}"}


def test_blocked_loopback_address_is_refused(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path, host="127.0.0.2") as srv:
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/a.png", upload_dir, policy=NetworkPolicy(allowed_hosts=("127.0.0.1",)))
        assert err.value.failure.reason == "forbidden_address"
        assert "allow_private_networks" in err.value.failure.message
        assert srv.requests == []  # refused before connecting


def test_redirect_to_forbidden_address_is_refused(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as srv:
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/redirect-to/http://169.254.169.254/latest/meta-data", upload_dir)
        assert err.value.failure.reason == "forbidden_address"


@pytest.mark.parametrize(
    "ip, kind",
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),
        ("192.0.0.192", "metadata"),
        ("64:ff9b:1::808:808", "private"),  # local-use NAT64 (RFC 8215), even for a public IPv4
        ("::ffff:169.254.169.254", "metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("0.0.0.0", "unroutable"),
        ("8.8.8.8", "public"),
        ("2606:4700::1111", "public"),
    ],
)
def test_address_classification(ip, kind):
    assert classify_address(ip) == kind


def test_policy_switches():
    NetworkPolicy(allow_private_networks=True).check_address("nas", "192.168.1.5")
    with pytest.raises(TaskError):
        NetworkPolicy(allow_private_networks=True).check_address("meta", "169.254.169.254")
    NetworkPolicy(allowed_hosts=("169.254.0.0/16",)).check_address("meta", "169.254.169.254")
    with pytest.raises(TaskError):
        NetworkPolicy().check_address("nas", "10.0.0.1")
    NetworkPolicy().check_address("nas", "10.0.0.1", trusted_host=True)  # the Label Studio host


def test_https_is_verified_on_the_pinned_socket(tmp_path, upload_dir):
    # A self-signed certificate: the TLS handshake runs on the socket we
    # connected to the vetted address, and an untrusted certificate is refused.
    import shutil
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as srv:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv._httpd.socket = ctx.wrap_socket(srv._httpd.socket, server_side=True)
        with pytest.raises(TaskError) as err:
            fetch(f"https://127.0.0.1:{srv.port}/a.png", upload_dir)
        assert err.value.failure.reason == "tls_error"
        assert "certificate" in err.value.failure.message
