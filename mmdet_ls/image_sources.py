"""Find and fetch the bytes of a task's image.

Three sources, tried in this order for what a task's image value names:
1. a Label Studio upload on this machine (`/data/upload/...` under image_dir);
2. Label Studio itself (relative `/data/...` URLs, or URLs on its host), with
   the user's token;
3. any other http(s) URL, without credentials.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import requests

from .failures import TaskError
from .network_policy import NetworkPolicy

UPLOAD_PREFIX = "/data/upload/"


def default_image_dir() -> str:
    """Label Studio's upload folder: <data dir>/media/upload, where the data dir
    honours LABEL_STUDIO_BASE_DATA_DIR like Label Studio itself does."""
    base = os.environ.get("LABEL_STUDIO_BASE_DATA_DIR")
    if not base:
        xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        base = os.path.join(xdg, "label-studio")
    return os.path.join(base, "media", "upload")


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0  # whole download, defeats slow trickles
    max_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5


@dataclass
class ImageBytes:
    data: bytes
    source: str  # "local", "label_studio" or "remote"
    content_type: str = ""


def same_origin(url: str, base_url: str | None) -> bool:
    if not base_url:
        return False
    a, b = urlsplit(url), urlsplit(base_url)

    def port(p):
        return p.port or (443 if p.scheme == "https" else 80)

    return (a.scheme, (a.hostname or "").lower(), port(a)) == (b.scheme, (b.hostname or "").lower(), port(b))


# ---------------------------------------------------------------- local files
def resolve_upload_path(image_dir: str, url: str) -> Path | None:
    """Path of a Label Studio upload inside image_dir, or None when `url` is not
    an upload. Raises TaskError when the path tries to leave image_dir."""
    path = urlsplit(url).path if "://" in url else url.split("?", 1)[0]
    if not path.startswith(UPLOAD_PREFIX):
        return None
    relative = unquote(path[len(UPLOAD_PREFIX):])
    parts = relative.replace("\\", "/").split("/")
    if "\x00" in relative or any(p in ("..", ".") for p in parts) or relative.startswith("/"):
        raise TaskError("forbidden_path", f"upload path {url!r} leaves the upload folder")
    root = Path(image_dir).resolve()
    candidate = (root / relative).resolve()
    if root != candidate and root not in candidate.parents:
        raise TaskError("forbidden_path", f"upload path {url!r} resolves outside the upload folder")
    return candidate


def read_local_file(path: Path, max_bytes: int) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskError("not_found", f"upload not found on this machine: {path.name}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TaskError("forbidden_path", f"upload {path.name} is not a regular file")
    if st.st_size > max_bytes:
        raise TaskError("too_large", f"image file is {st.st_size} bytes; at most {max_bytes} allowed")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


# ---------------------------------------------------------- Label Studio auth
def _jwt_claims(token: str) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """Authorization header for one Label Studio host and API key.

    A legacy token goes as `Token <key>`. A personal access token (a JWT
    refresh token) is exchanged at /api/token/refresh/ for a short-lived
    access token, sent as `Bearer`, and exchanged again shortly before expiry.
    """

    def __init__(self, base_url: str, api_key: str, session: requests.Session, limits: FetchLimits):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session
        self._limits = limits
        self._is_pat = _jwt_claims(api_key) is not None
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    def __repr__(self):  # never show the key
        return f"LabelStudioAuth({self.base_url!r}, {'pat' if self._is_pat else 'legacy'})"

    def headers(self, force_refresh: bool = False) -> dict[str, str]:
        if not self._is_pat:
            return {"Authorization": f"Token {self._api_key}"}
        with self._lock:
            if force_refresh or not self._access or time.time() > self._access_expires - 30:
                self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = self._session.post(
                url,
                json={"refresh": self._api_key},
                timeout=(self._limits.connect_timeout_s, self._limits.read_timeout_s),
            )
        except requests.RequestException as exc:
            raise TaskError(
                "label_studio_auth", f"cannot reach Label Studio to exchange the token: {type(exc).__name__}",
                retriable=True,
            ) from None
        if resp.status_code != 200:
            raise TaskError(
                "label_studio_auth",
                f"Label Studio refused the personal access token (HTTP {resp.status_code} from "
                "/api/token/refresh/); check LABEL_STUDIO_API_KEY",
            )
        access = resp.json().get("access")
        if not access:
            raise TaskError("label_studio_auth", "Label Studio's token refresh answered without an access token")
        claims = _jwt_claims(access) or {}
        self._access = access
        self._access_expires = float(claims.get("exp", time.time() + 240))


# --------------------------------------------------------------- HTTP fetching
def _read_body(resp: requests.Response, limits: FetchLimits, deadline: float) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        raise TaskError("too_large", f"image is {int(length)} bytes; at most {limits.max_bytes} allowed")
    chunks, total = [], 0
    raw = resp.raw
    while True:
        if time.monotonic() > deadline:
            raise TaskError(
                "timeout", f"image download took longer than {limits.total_timeout_s:g} s", retriable=True
            )
        # read1 returns what one socket read gives, so the deadline is checked
        # even when the server trickles a byte at a time.
        chunk = raw.read1(65536) if hasattr(raw, "read1") else raw.read(65536)
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_bytes:
            raise TaskError("too_large", f"image is larger than {limits.max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_peer(resp: requests.Response, policy: NetworkPolicy, host: str, trusted: bool) -> None:
    # Re-check the address actually connected to (defeats DNS rebinding).
    try:
        sock = resp.raw._connection.sock  # urllib3 internals; absent on reused conns
        peer = sock.getpeername()[0] if sock is not None else None
    except (AttributeError, OSError):
        peer = None
    if peer:
        policy.check_address(host, peer, trusted_host=trusted)


def http_get_image(
    url: str,
    session: requests.Session,
    limits: FetchLimits,
    policy: NetworkPolicy,
    label_studio_url: str | None = None,
    auth: LabelStudioAuth | None = None,
) -> ImageBytes:
    """GET an image with timeouts, a size cap, per-hop address checks, and
    credentials sent only to the Label Studio host."""
    deadline = time.monotonic() + limits.total_timeout_s
    current = url
    retried_auth = False
    for _hop in range(limits.max_redirects + 1):
        parts = urlsplit(current)
        if parts.scheme not in ("http", "https"):
            raise TaskError("bad_url", f"unsupported URL scheme {parts.scheme!r}: only http and https are fetched")
        trusted = same_origin(current, label_studio_url)
        policy.check_url_host(current, trusted_host=trusted)
        headers = {"Accept": "image/*,*/*;q=0.5", "User-Agent": "mmdet-labelstudio-backend"}
        if trusted and auth is not None:
            headers.update(auth.headers())
        remaining = max(0.1, deadline - time.monotonic())
        try:
            resp = session.get(
                current,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(min(limits.connect_timeout_s, remaining), min(limits.read_timeout_s, remaining)),
            )
        except requests.Timeout:
            raise TaskError("timeout", f"timed out fetching {_safe(current)}", retriable=True) from None
        except requests.ConnectionError as exc:
            raise TaskError(
                "connection_error", f"cannot connect to {_safe(current)}: {type(exc).__name__}", retriable=True
            ) from None
        except requests.RequestException as exc:
            raise TaskError("bad_url", f"cannot fetch {_safe(current)}: {type(exc).__name__}") from None
        with resp:
            _check_peer(resp, policy, parts.hostname or "", trusted)
            if resp.is_redirect:
                location = resp.headers.get("Location", "")
                current = urljoin(current, location)
                continue
            if resp.status_code == 401 and trusted and auth is not None and not retried_auth:
                retried_auth = True  # access token may have expired early: exchange once more
                auth.headers(force_refresh=True)
                continue
            if resp.status_code != 200:
                raise TaskError(
                    f"http_{resp.status_code}",
                    f"{_safe(current)} answered HTTP {resp.status_code}"
                    + (" (check the Label Studio API key)" if trusted and resp.status_code in (401, 403) else ""),
                    retriable=resp.status_code >= 500 or resp.status_code == 429,
                )
            data = _read_body(resp, limits, deadline)
            return ImageBytes(
                data=data,
                source="label_studio" if trusted else "remote",
                content_type=resp.headers.get("Content-Type", ""),
            )
    raise TaskError("redirect_loop", f"more than {limits.max_redirects} redirects fetching {_safe(url)}")


def _safe(url: str) -> str:
    """URL for messages: no query string (it may carry signed credentials)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc.rsplit('@', 1)[-1]}{p.path}" if p.scheme else url[:200]


CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
DATA_URI_PREFIX = "data:"


def _decode_data_uri(value: str, max_bytes: int) -> bytes:
    header, _, payload = value.partition(",")
    if ";base64" not in header:
        raise TaskError("bad_url", "data: URIs must be base64-encoded images")
    if len(payload) * 3 // 4 > max_bytes:
        raise TaskError("too_large", f"inline image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError:
        raise TaskError("bad_url", "data: URI is not valid base64") from None


def fetch_image_bytes(
    value,
    *,
    image_dir: str,
    session: requests.Session,
    limits: FetchLimits,
    policy: NetworkPolicy,
    label_studio_url: str | None = None,
    auth: LabelStudioAuth | None = None,
    task_id=None,
) -> ImageBytes:
    """Bytes of the image that a task's data value names."""
    if not isinstance(value, str) or not value.strip():
        raise TaskError("bad_task", f"image value must be a non-empty string, got {type(value).__name__}")
    value = value.strip()
    if len(value) > 64 * 1024 and not value.startswith(DATA_URI_PREFIX):
        raise TaskError("bad_url", "image URL is longer than 64 KiB")
    scheme = urlsplit(value).scheme.lower() if "://" in value or value.startswith(DATA_URI_PREFIX) else ""

    if value.startswith(DATA_URI_PREFIX):
        return ImageBytes(data=_decode_data_uri(value, limits.max_bytes), source="inline")

    if not scheme or (scheme in ("http", "https") and same_origin(value, label_studio_url)):
        local = resolve_upload_path(image_dir, value)
        if local is not None and local.exists():
            return ImageBytes(data=read_local_file(local, limits.max_bytes), source="local")

    if not scheme:
        if not value.startswith("/"):
            raise TaskError("bad_url", f"image value {value[:200]!r} is neither a URL nor a Label Studio path")
        if not label_studio_url:
            raise TaskError(
                "no_label_studio_url",
                f"{value[:200]!r} is a Label Studio path that is not under image_dir ({image_dir}) and no "
                "Label Studio URL is known: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) or image_dir",
            )
        value = label_studio_url.rstrip("/") + value
        scheme = urlsplit(value).scheme

    if scheme in CLOUD_SCHEMES:
        if not label_studio_url or task_id is None:
            raise TaskError(
                "bad_url",
                f"{scheme}:// images are resolved through Label Studio; set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY",
            )
        encoded = base64.urlsafe_b64encode(value.encode()).decode()
        value = f"{label_studio_url.rstrip('/')}/tasks/{task_id}/presign/?fileuri={encoded}"
        scheme = "http"

    if scheme not in ("http", "https"):
        raise TaskError("bad_url", f"unsupported URL scheme {scheme!r}: only http(s), Label Studio paths and data: URIs")
    return http_get_image(
        value, session, limits, policy, label_studio_url=label_studio_url, auth=auth
    )
