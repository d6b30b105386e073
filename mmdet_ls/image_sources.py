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


MAX_URL_IN_MESSAGE = 300  # characters of a URL or path quoted back in an error message


def split_url(url: str):
    """urlsplit, with TaskError for what it refuses (e.g. "http://[::1/")."""
    try:
        return urlsplit(url)
    except ValueError:
        raise TaskError("bad_url", f"malformed URL: {_quote(url)}") from None


def url_port(parts) -> int:
    """The URL's port; TaskError (not ValueError) for a malformed one."""
    try:
        port = parts.port
    except ValueError:
        raise TaskError("bad_url", f"URL has an invalid port: {_safe(parts.geturl())}") from None
    return port or (443 if parts.scheme == "https" else 80)


def same_origin(url: str, base_url: str | None) -> bool:
    if not base_url:
        return False
    try:
        a, b = urlsplit(url), urlsplit(base_url)
        return (a.scheme, (a.hostname or "").lower(), url_port(a)) == (
            b.scheme, (b.hostname or "").lower(), url_port(b)
        )
    except (TaskError, ValueError):
        return False


def _quote(value: str) -> str:
    """A user-supplied value for an error message: repr, and not too long."""
    text = repr(value)
    return text if len(text) <= MAX_URL_IN_MESSAGE else text[:MAX_URL_IN_MESSAGE] + "...'"


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
        raise TaskError("forbidden_path", f"upload path {_quote(url)} leaves the upload folder")
    root = Path(image_dir).resolve()
    try:
        candidate = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the OS cannot take
        raise TaskError("forbidden_path", f"upload path {_quote(url)} cannot be resolved") from None
    if root != candidate and root not in candidate.parents:
        raise TaskError("forbidden_path", f"upload path {_quote(url)} resolves outside the upload folder")
    return candidate


def read_local_file(path: Path, max_bytes: int, root: Path | str | None = None) -> bytes:
    """Read an upload that resolve_upload_path approved.

    The path is opened without following a final symlink and without
    blocking (a FIFO planted in the upload folder cannot hang the loader),
    and the checks run on the opened file: with `root`, where the opened
    file really lives is checked again (Linux /proc/self/fd), so a folder
    swapped for a symlink after the path check reads nothing outside.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TaskError("not_found", f"upload not found on this machine: {_quote(path.name)}") from None
    except OSError as exc:  # ELOOP: the last component became a symlink; EACCES, ...
        raise TaskError("forbidden_path", f"upload {_quote(path.name)} cannot be opened: {exc.strerror}") from None
    try:
        if root is not None and os.path.isdir("/proc/self/fd"):
            try:
                real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                real = None
            resolved_root = Path(root).resolve()
            if real is not None and real != resolved_root and resolved_root not in real.parents:
                raise TaskError("forbidden_path", f"upload {_quote(path.name)} resolves outside the upload folder")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TaskError("forbidden_path", f"upload {_quote(path.name)} is not a regular file")
        if st.st_size > max_bytes:
            raise TaskError("too_large", f"image file is {st.st_size} bytes; at most {max_bytes} allowed")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TaskError("too_large", f"image file is larger than {max_bytes} bytes")
    return data


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):  # ENAMETOOLONG and the like: not an upload we have
        return False


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
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        access = answer.get("access") if isinstance(answer, dict) else None
        if not isinstance(access, str) or not access:
            raise TaskError("label_studio_auth", "Label Studio's token refresh answered without an access token")
        claims = _jwt_claims(access) or {}
        self._access = access
        try:
            self._access_expires = float(claims.get("exp", time.time() + 240))
        except (TypeError, ValueError):
            self._access_expires = time.time() + 240


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
    # Credentials go only on hops of a chain that started at Label Studio and
    # stayed there: a foreign server that redirects to Label Studio's host
    # does not get the backend to fetch Label Studio pages with its token.
    chain_trusted = True
    for _hop in range(limits.max_redirects + 1):
        parts = split_url(current)
        if parts.scheme not in ("http", "https"):
            raise TaskError(
                "bad_url", f"unsupported URL scheme {_quote(parts.scheme)}: only http and https are fetched"
            )
        check_url_text(current)
        url_port(parts)
        trusted = same_origin(current, label_studio_url)
        chain_trusted = chain_trusted and trusted
        send_credentials = chain_trusted and auth is not None
        policy.check_url_host(current, trusted_host=trusted)
        # identity: raw socket bytes are what is counted and capped, and a
        # gzip "image" would otherwise reach the decoder still compressed.
        headers = {
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
            "User-Agent": "mmdet-labelstudio-backend",
        }
        if send_credentials:
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
        except (requests.RequestException, ValueError) as exc:  # ValueError: http.client's InvalidURL, ...
            raise TaskError("bad_url", f"cannot fetch {_safe(current)}: {type(exc).__name__}") from None
        with resp:
            _check_peer(resp, policy, parts.hostname or "", trusted)
            if resp.is_redirect:
                location = resp.headers.get("Location", "").strip()
                if not location:
                    raise TaskError("bad_url", f"{_safe(current)} answered a redirect without a Location")
                try:
                    current = urljoin(current, location)
                except ValueError:
                    raise TaskError("bad_url", f"{_safe(current)} redirected to a malformed URL") from None
                continue
            if resp.status_code == 401 and send_credentials and not retried_auth:
                retried_auth = True  # access token may have expired early: exchange once more
                auth.headers(force_refresh=True)
                continue
            if resp.status_code != 200:
                raise TaskError(
                    f"http_{resp.status_code}",
                    f"{_safe(current)} answered HTTP {resp.status_code}"
                    + (" (check the Label Studio API key)" if send_credentials and resp.status_code in (401, 403) else ""),
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
    """URL for messages: no user:password, no query string (it may carry
    signed credentials), and not too long."""
    try:
        p = urlsplit(url)
    except ValueError:
        p = urlsplit("")
    text = f"{p.scheme}://{p.netloc.rsplit('@', 1)[-1]}{p.path}" if p.scheme else url
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= MAX_URL_IN_MESSAGE else text[:MAX_URL_IN_MESSAGE] + "..."


def check_url_text(url: str) -> None:
    """Refuse URLs no well-behaved client sends: control characters (header
    injection, request smuggling) and text that is not valid Unicode.
    (Spaces are fine: requests percent-encodes them, as browsers do.)"""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise TaskError("bad_url", f"URL contains control characters: {_quote(url)}")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise TaskError("bad_url", f"URL is not valid Unicode text: {_quote(url)}") from None


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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TaskError("bad_url", f"image value is not valid Unicode text: {_quote(value[:200])}") from None
    split_url(value)  # refuses what urlsplit cannot parse, before anything else looks at it
    if len(value) > 64 * 1024 and not value.startswith(DATA_URI_PREFIX):
        raise TaskError("bad_url", "image URL is longer than 64 KiB")
    scheme = urlsplit(value).scheme.lower() if "://" in value or value.startswith(DATA_URI_PREFIX) else ""

    if value.startswith(DATA_URI_PREFIX):
        return ImageBytes(data=_decode_data_uri(value, limits.max_bytes), source="inline")

    if not scheme or (scheme in ("http", "https") and same_origin(value, label_studio_url)):
        local = resolve_upload_path(image_dir, value)
        if local is not None and _exists(local):
            return ImageBytes(data=read_local_file(local, limits.max_bytes, root=image_dir), source="local")

    if not scheme:
        if not value.startswith("/"):
            raise TaskError("bad_url", f"image value {_quote(value[:200])} is neither a URL nor a Label Studio path")
        if not label_studio_url:
            raise TaskError(
                "no_label_studio_url",
                f"{_quote(value[:200])} is a Label Studio path that is not under image_dir ({image_dir}) and no "
                "Label Studio URL is known: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) or image_dir",
            )
        value = label_studio_url.rstrip("/") + value
        scheme = split_url(value).scheme

    if scheme in CLOUD_SCHEMES:
        if not label_studio_url or task_id is None:
            raise TaskError(
                "bad_url",
                f"{scheme}:// images are resolved through Label Studio; set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY",
            )
        if isinstance(task_id, bool) or not (
            isinstance(task_id, int) or (isinstance(task_id, str) and task_id.isascii() and task_id.isdigit())
        ):
            # The id goes into a Label Studio URL path: digits only, no "../".
            raise TaskError("bad_task", f"{scheme}:// images need the task's numeric id, got {_quote(str(task_id)[:50])}")
        encoded = base64.urlsafe_b64encode(value.encode()).decode()
        value = f"{label_studio_url.rstrip('/')}/tasks/{task_id}/presign/?fileuri={encoded}"
        scheme = "http"

    if scheme not in ("http", "https"):
        raise TaskError(
            "bad_url", f"unsupported URL scheme {_quote(scheme[:50])}: only http(s), Label Studio paths and data: URIs"
        )
    return http_get_image(
        value, session, limits, policy, label_studio_url=label_studio_url, auth=auth
    )
