"""Find and fetch the bytes of a task's image.

Three sources, tried in this order for what a task's image value names:
1. a Label Studio upload on this machine (`/data/upload/...` under image_dir);
2. Label Studio itself (relative `/data/...` URLs, or URLs on its origin),
   with its key, and only under the paths where Label Studio serves media;
3. any other http(s) URL, without Label Studio's key.
Every URL is parsed once (`mmdet_ls.urls`) and fetched by the pinned client
(`mmdet_ls.http_fetch`) from that same parse.
"""
from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from .failures import TaskError
from .http_fetch import CancelToken, FetchLimits, Response, get, request
from .network_policy import NetworkPolicy
from .urls import URL, URLError, decoded_path_segments, parse_url, redact_text

__all__ = ["FetchLimits", "ImageBytes", "LabelStudioAccess", "LabelStudioAuth", "fetch_image_bytes"]

UPLOAD_PREFIX = "/data/upload/"
# Where Label Studio 1.23 serves task media (data_import/urls.py:
# data/upload/<path>, storage-data/uploaded/; io_storages/urls.py:
# data/local-files/, tasks|projects/<id>/resolve/ and the older .../presign/).
# The key goes nowhere else on its origin: never to /api/.
LABEL_STUDIO_MEDIA_PATHS = (
    re.compile(r"^/data/upload/[^?]+$"),
    re.compile(r"^/data/local-files/$"),
    re.compile(r"^/storage-data/uploaded/$"),
    re.compile(r"^/(?:tasks|projects)/[0-9]+/(?:presign|resolve)/$"),
)
MAX_TOKEN_CHARS = 4096  # a JWT access token is < 1 KiB; anything near this is not one
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
TOKEN_REFRESH_MAX_BYTES = 8 * 1024


def default_image_dir() -> str:
    """Label Studio's upload folder: <data dir>/media/upload, where the data dir
    honours LABEL_STUDIO_BASE_DATA_DIR like Label Studio itself does."""
    base = os.environ.get("LABEL_STUDIO_BASE_DATA_DIR")
    if not base:
        xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        base = os.path.join(xdg, "label-studio")
    return os.path.join(base, "media", "upload")


@dataclass
class ImageBytes:
    data: bytes
    source: str  # "local", "label_studio", "remote" or "inline"
    content_type: str = ""


def check_api_key(key: str, what: str) -> str:
    """A key fit for an Authorization header, or ValueError naming the setting."""
    if not isinstance(key, str) or not key or len(key) > MAX_TOKEN_CHARS or not TOKEN_RE.match(key):
        raise ValueError(f"{what} is not a Label Studio key (expected at most {MAX_TOKEN_CHARS} token characters)")
    return key


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the key that belongs to it: the key is only
    ever sent to `base`'s origin, under its media paths."""

    base: URL
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_text(cls, url: str, api_key: str | None = None) -> LabelStudioAccess:
        base = parse_url(url.strip().rstrip("/"))
        if base.userinfo is not None or "?" in base.target:
            raise URLError("the Label Studio URL must not carry user:password or a query")
        return cls(base, check_api_key(api_key, "the Label Studio key") if api_key else None)

    @property
    def prefix(self) -> str:
        """Path Label Studio is served under ("" at the root)."""
        return self.base.path.rstrip("/")

    def url_for(self, path_and_query: str) -> URL:
        return parse_url(f"{self.base.scheme}://{self.base.host_header}{self.prefix}{path_and_query}")

    def owns(self, url: URL) -> bool:
        return url.origin == self.base.origin

    def check_media_path(self, url: URL) -> None:
        """Refuse any URL on Label Studio's origin that is not one of its media paths."""
        path = url.path
        decoded = decoded_path_segments(url)
        if len(decoded) != len(path.split("/")) or any(s in (".", "..") for s in decoded) or "\x00" in path:
            raise TaskError("forbidden_path", f"{url.redacted()}: encoded '/', '.' or '..' in a Label Studio path")
        if path.startswith(self.prefix + "/"):
            rest = path[len(self.prefix):]
            if any(p.match(rest) for p in LABEL_STUDIO_MEDIA_PATHS):
                return
        raise TaskError(
            "forbidden_path",
            f"{url.redacted()} is on Label Studio but not where it serves media (/data/upload/, "
            "/data/local-files/, /storage-data/uploaded/, storage resolve): not fetched",
        )


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
    """Authorization header for one LabelStudioAccess.

    A legacy token goes as `Token <key>`. A personal access token (a JWT
    refresh token) is exchanged at /api/token/refresh/ (one hop, no
    redirects, the same network policy, a few KiB read) for a short-lived
    access token, sent as `Bearer`, and exchanged again shortly before expiry.
    """

    def __init__(self, access: LabelStudioAccess, limits: FetchLimits, policy: NetworkPolicy):
        self.access = access
        self._limits = limits
        self._policy = policy
        self.is_pat = _jwt_claims(access.api_key or "") is not None
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    def __repr__(self):  # never show the key
        return f"LabelStudioAuth({self.access.base.redacted()!r}, {'pat' if self.is_pat else 'legacy'})"

    def headers(self, force_refresh: bool = False, cancel: CancelToken | None = None) -> dict[str, str]:
        if not self.is_pat:
            return {"Authorization": f"Token {self.access.api_key}"}
        with self._lock:
            if force_refresh or not self._access or time.time() > self._access_expires - 30:
                self._exchange(cancel)
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self, cancel: CancelToken | None) -> None:
        url = self.access.url_for("/api/token/refresh/")
        body = json.dumps({"refresh": self.access.api_key}).encode()
        limits = FetchLimits(self._limits.connect_timeout_s, self._limits.read_timeout_s,
                             min(self._limits.total_timeout_s, self._limits.read_timeout_s), TOKEN_REFRESH_MAX_BYTES, 0)
        try:
            with request(url, policy=self._policy, limits=limits, trusted_host=True, method="POST", body=body,
                         headers={"Content-Type": "application/json", "Accept": "application/json"},
                         cancel=cancel) as resp:
                if resp.status != 200:
                    raise TaskError(
                        "label_studio_auth",
                        f"Label Studio refused the personal access token (HTTP {resp.status} from "
                        "/api/token/refresh/); check LABEL_STUDIO_API_KEY",
                    )
                raw = resp.read(TOKEN_REFRESH_MAX_BYTES)
        except TaskError as exc:
            if exc.failure.reason == "label_studio_auth":
                raise
            raise TaskError("label_studio_auth", f"cannot exchange the token with Label Studio: {exc.failure.message}",
                            retriable=exc.failure.retriable) from None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        token = answer.get("access") if isinstance(answer, dict) else None
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not TOKEN_RE.match(token):
            raise TaskError("label_studio_auth",
                            "Label Studio's token refresh did not answer with a usable access token")
        claims = _jwt_claims(token) or {}
        self._access = token
        try:
            self._access_expires = float(claims.get("exp", time.time() + 240))
        except (TypeError, ValueError):
            self._access_expires = time.time() + 240


# ---------------------------------------------------------------- local files
def resolve_upload_path(image_dir: str, path: str) -> Path | None:
    """Path of a Label Studio upload inside image_dir, or None when `path` (a
    URL path) is not an upload. TaskError when it tries to leave image_dir."""
    if not path.startswith(UPLOAD_PREFIX):
        return None
    relative = unquote(path[len(UPLOAD_PREFIX):])
    parts = relative.replace("\\", "/").split("/")
    if "\x00" in relative or any(p in ("..", ".") for p in parts) or relative.startswith("/"):
        raise TaskError("forbidden_path", f"upload path '{redact_text(path)}' leaves the upload folder")
    root = Path(image_dir).resolve()
    try:
        candidate = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the OS cannot take
        raise TaskError("forbidden_path", f"upload path '{redact_text(path)}' cannot be resolved") from None
    if root != candidate and root not in candidate.parents:
        raise TaskError("forbidden_path", f"upload path '{redact_text(path)}' resolves outside the upload folder")
    return candidate


def read_local_file(path: Path, max_bytes: int, root: Path | str | None = None) -> bytes:
    """Read an upload that resolve_upload_path approved.

    The path is opened without following a final symlink and without
    blocking (a FIFO planted in the upload folder cannot hang the loader),
    and the checks run on the opened file: with `root`, where the opened
    file really lives is checked again (Linux /proc/self/fd), so a folder
    swapped for a symlink after the path check reads nothing outside.
    """
    name = redact_text(path.name)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TaskError("not_found", f"upload not found on this machine: '{name}'") from None
    except OSError as exc:  # ELOOP: the last component became a symlink; EACCES, ...
        raise TaskError("forbidden_path", f"upload '{name}' cannot be opened: {exc.strerror}") from None
    try:
        if root is not None and os.path.isdir("/proc/self/fd"):
            try:
                real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                real = None
            resolved_root = Path(root).resolve()
            if real is not None and real != resolved_root and resolved_root not in real.parents:
                raise TaskError("forbidden_path", f"upload '{name}' resolves outside the upload folder")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TaskError("forbidden_path", f"upload '{name}' is not a regular file")
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


# --------------------------------------------------------------- HTTP fetching
def _basic_header(userinfo: str) -> str:
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return f"Basic {token}"


def http_get_image(
    url: URL,
    limits: FetchLimits,
    policy: NetworkPolicy,
    access: LabelStudioAccess | None = None,
    auth: LabelStudioAuth | None = None,
    cancel: CancelToken | None = None,
) -> ImageBytes:
    """GET an image: every hop pinned and vetted, the Label Studio key only on
    a chain that started on Label Studio's media paths and stayed there, URL
    userinfo (as Basic auth) only on its own origin."""
    if url.userinfo is not None and access is not None and access.owns(url):
        raise URLError(f"{url.redacted()}: Label Studio URLs must not carry user:password")
    deadline = time.monotonic() + limits.total_timeout_s
    sent_key = False

    def trusted(hop: URL) -> bool:
        return access is not None and access.owns(hop)

    def hop_headers(hop: URL, chain_trusted: bool) -> dict[str, str]:
        nonlocal sent_key
        headers = {"Accept": "image/*,*/*;q=0.5"}
        if hop is not url and hop.userinfo is not None:
            raise URLError(f"{hop.redacted()}: a redirect may not carry user:password")
        if trusted(hop):
            access.check_media_path(hop)
            if chain_trusted and auth is not None:
                headers.update(auth.headers(cancel=cancel))
                sent_key = True
        elif url.userinfo is not None and hop.origin == url.origin:
            headers["Authorization"] = _basic_header(url.userinfo)
        return headers

    resp = get(url, policy=policy, limits=limits, hop_headers=hop_headers, trusted=trusted, deadline=deadline,
               cancel=cancel)
    if resp.status == 401 and sent_key and auth.is_pat:
        resp.close()  # the access token may have expired early: exchange once more
        auth.headers(force_refresh=True, cancel=cancel)
        resp = get(url, policy=policy, limits=limits, hop_headers=hop_headers, trusted=trusted, deadline=deadline,
                   cancel=cancel)
    with resp:
        return _image_from(resp, limits, source="label_studio" if trusted(resp.url) else "remote",
                           sent_key=sent_key)


def _image_from(resp: Response, limits: FetchLimits, source: str, sent_key: bool) -> ImageBytes:
    if resp.status != 200:
        raise TaskError(
            f"http_{resp.status}",
            f"{resp.url.redacted()} answered HTTP {resp.status}"
            + (" (check the Label Studio API key)" if sent_key and resp.status in (401, 403) else ""),
            retriable=resp.status >= 500 or resp.status == 429,
        )
    try:
        data = resp.read(limits.max_bytes)
    except TaskError as exc:
        if exc.failure.reason == "too_large":
            length = resp.header("Content-Length").strip()
            raise TaskError("too_large", f"image is {int(length)} bytes; at most {limits.max_bytes} allowed"
                            if length.isdigit() else f"image is larger than {limits.max_bytes} bytes") from None
        if exc.failure.reason == "timeout":
            raise TaskError("timeout", f"image download took longer than {limits.total_timeout_s:g} s",
                            retriable=True) from None
        raise
    return ImageBytes(data=data, source=source, content_type=resp.header("Content-Type"))


CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
DATA_URI_PREFIX = "data:"
MAX_VALUE_CHARS = 64 * 1024
_SCHEME_PREFIX_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _decode_data_uri(value: str, max_bytes: int) -> bytes:
    header, _, payload = value.partition(",")
    if ";base64" not in header:
        raise TaskError("bad_url", "data: URIs must be base64-encoded images")
    if len(payload) * 3 // 4 > max_bytes:
        raise TaskError("too_large", f"inline image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError:
        raise TaskError("bad_url", "data: URIs must be base64-encoded images") from None


def _task_id_digits(task_id, scheme: str) -> str:
    if isinstance(task_id, bool) or not (
        isinstance(task_id, int) or (isinstance(task_id, str) and task_id.isascii() and task_id.isdigit())
    ):
        # The id goes into a Label Studio URL path: digits only, no "../".
        raise TaskError("bad_task",
                        f"{scheme}:// images need the task's numeric id, got '{redact_text(str(task_id)[:50])}'")
    return str(task_id)


def fetch_image_bytes(
    value,
    *,
    image_dir: str,
    limits: FetchLimits,
    policy: NetworkPolicy,
    access: LabelStudioAccess | None = None,
    auth: LabelStudioAuth | None = None,
    task_id=None,
    cancel: CancelToken | None = None,
) -> ImageBytes:
    """Bytes of the image that a task's data value names."""
    if not isinstance(value, str) or not value.strip():
        raise TaskError("bad_task", f"image value must be a non-empty string, got {type(value).__name__}")
    value = value.strip()
    if value.startswith(DATA_URI_PREFIX):
        return ImageBytes(data=_decode_data_uri(value, limits.max_bytes), source="inline")
    if len(value) > MAX_VALUE_CHARS:
        raise TaskError("bad_url", "image URL is longer than 64 KiB")

    if value.startswith("/") and not value.startswith("//"):
        # A Label Studio path: an upload on this machine, else Label Studio's.
        parse_url("http://label-studio" + value)  # same text rules as any URL (no backslash, no controls)
        local = resolve_upload_path(image_dir, value.split("?", 1)[0].split("#", 1)[0])
        if local is not None and _exists(local):
            return ImageBytes(data=read_local_file(local, limits.max_bytes, root=image_dir), source="local")
        if access is None:
            raise TaskError(
                "no_label_studio_url",
                f"'{redact_text(value[:200])}' is a Label Studio path that is not in image_dir and no Label Studio "
                "URL is known: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY), or image_dir",
            )
        url = access.url_for(value)
    else:
        match = _SCHEME_PREFIX_RE.match(value)
        if not match:
            raise TaskError("bad_url",
                            f"image value '{redact_text(value[:200])}' is neither a URL nor a Label Studio path")
        scheme = match.group(1).lower()
        if scheme in CLOUD_SCHEMES:
            if access is None:
                raise TaskError(
                    "bad_url",
                    f"{scheme}:// images are resolved through Label Studio; set LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY",
                )
            task = _task_id_digits(task_id, scheme)
            encoded = base64.urlsafe_b64encode(value.encode()).decode()
            url = access.url_for(f"/tasks/{task}/presign/?fileuri={encoded}")
        elif scheme not in ("http", "https"):
            raise TaskError(
                "bad_url",
                f"unsupported URL scheme '{redact_text(scheme[:50])}': only http(s), Label Studio paths and data: URIs",
            )
        else:
            url = parse_url(value)
            if access is not None and access.owns(url) and url.path.startswith(access.prefix + UPLOAD_PREFIX):
                local = resolve_upload_path(image_dir, url.path[len(access.prefix):])
                if local is not None and _exists(local):
                    return ImageBytes(data=read_local_file(local, limits.max_bytes, root=image_dir), source="local")
    return http_get_image(url, limits, policy, access=access, auth=auth, cancel=cancel)
