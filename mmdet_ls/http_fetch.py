"""HTTP GET/POST that connects to exactly the address it checked.

For every hop: the host of the parsed `URL` is resolved once (with a
timeout), every address is vetted by the `NetworkPolicy`, and the socket
connects to one of those addresses; Host and TLS SNI/certificate checks use
the URL's host. No byte is sent before the check. One wall-clock deadline
covers DNS, connect, TLS, status line, headers and body: a watchdog shuts
the socket down when it passes (a server trickling its headers cannot hold
a thread), and `CancelToken.cancel()` does the same at once.
No connection pooling, no cookies, no proxies, no environment settings.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from .failures import TaskError
from .network_policy import NetworkPolicy
from .urls import URL

DNS_THREADS = 8  # lookups at once per process; a stuck resolver holds one of these, never a caller


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0  # wall clock for the whole fetch, redirects included
    max_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5


class CancelToken:
    """Cancels a fetch from another thread: the socket is shut down at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._actions: dict[int, Callable[[], None]] = {}
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            actions = list(self._actions.values())
        for action in actions:
            action()

    def check(self) -> None:
        if self.cancelled:
            raise TaskError("cancelled", "the request was cancelled", retriable=True)

    def _attach(self, key: int, action: Callable[[], None]) -> None:
        with self._lock:
            self._actions[key] = action
            cancelled = self.cancelled
        if cancelled:
            action()

    def _detach(self, key: int) -> None:
        with self._lock:
            self._actions.pop(key, None)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One thread for all deadlines: shuts a socket down when its time is up."""

    def __init__(self):
        self._heap: list = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._live: dict[int, Callable[[], None]] = {}
        threading.Thread(target=self._run, name="fetch-watchdog", daemon=True).start()

    def schedule(self, when: float, action: Callable[[], None]) -> int:
        with self._cv:
            handle = next(self._ids)
            self._live[handle] = action
            heapq.heappush(self._heap, (when, handle))
            self._cv.notify()
            return handle

    def cancel(self, handle: int) -> None:
        with self._cv:
            self._live.pop(handle, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                when, handle = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cv.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                action = self._live.pop(handle, None)
            if action is not None:
                try:
                    action()
                except Exception:
                    pass


_watchdog: _Watchdog | None = None
_dns_pool: ThreadPoolExecutor | None = None
_init_lock = threading.Lock()


def _services() -> tuple[_Watchdog, ThreadPoolExecutor]:
    global _watchdog, _dns_pool
    with _init_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
            _dns_pool = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="dns")
        return _watchdog, _dns_pool


def _timeout(what: str, url: URL, limits: FetchLimits) -> TaskError:
    return TaskError("timeout", f"{what} {url.redacted()} took longer than {limits.total_timeout_s:g} s",
                     retriable=True)


def resolve(url: URL, timeout_s: float) -> list[str]:
    """Addresses of the URL's host (no lookup for an IP literal)."""
    try:
        import ipaddress

        return [str(ipaddress.ip_address(url.host))]
    except ValueError:
        pass
    _, pool = _services()
    future = pool.submit(socket.getaddrinfo, url.host, url.port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.01, timeout_s))
    except FutureTimeout:
        future.cancel()
        raise TaskError("dns_error", f"looking up {url.host} took longer than {timeout_s:.3g} s",
                        retriable=True) from None
    except (socket.gaierror, UnicodeError, ValueError, OSError) as exc:
        raise TaskError("dns_error", f"cannot resolve host {url.host}: {exc}", retriable=True) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise TaskError("dns_error", f"host {url.host} has no address", retriable=True)
    return addresses


class Response:
    """An open response; read it within the fetch's deadline, then close it."""

    def __init__(self, url: URL, raw: http.client.HTTPResponse, cut: _Cut, close_fn: Callable[[], None], limits):
        self.url = url
        self._raw = raw
        self._cut = cut
        self._close = close_fn
        self._limits = limits
        self.status = raw.status
        self.headers = raw.headers

    def header(self, name: str) -> str:
        return self.headers.get(name, "") or ""

    def iter_chunks(self, max_bytes: int, chunk_size: int = 65536) -> Iterator[bytes]:
        length = self.header("Content-Length").strip()
        expected = int(length) if length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise TaskError("too_large", f"response is {expected} bytes; at most {max_bytes} allowed")
        total = 0
        while True:
            try:
                chunk = self._raw.read1(chunk_size)
            except (OSError, http.client.HTTPException, ValueError):
                self._cut.check("downloading", self.url, self._limits)
                raise TaskError("connection_error", f"connection to {self.url.redacted()} broke off",
                                retriable=True) from None
            if not chunk:
                self._cut.check("downloading", self.url, self._limits)  # EOF because we cut it: not a body
                if expected is not None and total < expected and self.status not in (204, 304):
                    raise TaskError("connection_error", f"{self.url.redacted()} closed the connection after "
                                    f"{total} of {expected} bytes", retriable=True)
                return
            total += len(chunk)
            if total > max_bytes:
                raise TaskError("too_large", f"response is larger than {max_bytes} bytes")
            yield chunk

    def read(self, max_bytes: int) -> bytes:
        return b"".join(self.iter_chunks(max_bytes))

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Cut:
    """Whether the watchdog or a CancelToken shut the socket down, and why:
    a cut connection reads as EOF, which must never pass for a response."""

    def __init__(self):
        self.why: str | None = None

    def check(self, what: str, url: URL, limits: FetchLimits) -> None:
        if self.why == "cancelled":
            raise TaskError("cancelled", "the request was cancelled", retriable=True)
        if self.why == "timeout":
            raise _timeout(what, url, limits)


def _connect(url: URL, policy: NetworkPolicy, trusted_host: bool, limits: FetchLimits, deadline: float,
             cancel: CancelToken | None) -> socket.socket:
    remaining = deadline - time.monotonic()
    addresses = resolve(url, min(limits.connect_timeout_s, remaining))
    for address in addresses:  # all of them, before any byte goes out
        policy.check_address(url.host, address, trusted_host=trusted_host)
    last: Exception | None = None
    for address in addresses:
        if cancel is not None:
            cancel.check()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout("connecting to", url, limits)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(min(limits.connect_timeout_s, remaining))
        try:
            sock.connect((address, url.port))
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    if isinstance(last, socket.timeout):
        raise TaskError("timeout", f"connecting to {url.redacted()} timed out", retriable=True)
    raise TaskError("connection_error", f"cannot connect to {url.redacted()}: {type(last).__name__}", retriable=True)


_TLS_CONTEXT: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT


def request(
    url: URL,
    *,
    policy: NetworkPolicy,
    limits: FetchLimits,
    trusted_host: bool = False,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    deadline: float | None = None,
    cancel: CancelToken | None = None,
) -> Response:
    """One HTTP exchange, no redirects followed. The caller closes the Response."""
    if deadline is None:
        deadline = time.monotonic() + limits.total_timeout_s
    if cancel is not None:
        cancel.check()
    sock = _connect(url, policy, trusted_host, limits, deadline, cancel)
    watchdog, _ = _services()
    conn = None
    wire = sock  # becomes the TLS socket, which takes over the descriptor
    cut = _Cut()

    def stop(why: str) -> None:
        cut.why = cut.why or why
        _shutdown(wire)

    def close() -> None:
        watchdog.cancel(timer)
        if cancel is not None:
            cancel._detach(timer)
        if conn is not None:
            conn.close()
        try:
            wire.close()
        except OSError:
            pass

    timer = watchdog.schedule(deadline, lambda: stop("timeout"))
    if cancel is not None:
        cancel._attach(timer, lambda: stop("cancelled"))
    try:
        sock.settimeout(max(0.01, min(limits.read_timeout_s, deadline - time.monotonic())))
        if url.scheme == "https":
            wire = _tls_context().wrap_socket(sock, server_hostname=url.host, do_handshake_on_connect=False)
            wire.do_handshake()  # after `wire` is set, so the watchdog can cut a trickled handshake
        conn = http.client.HTTPConnection(url.host, url.port)
        conn.sock = wire
        conn.putrequest(method, url.target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", url.host_header)
        conn.putheader("Accept-Encoding", "identity")  # raw bytes are what is counted and capped
        conn.putheader("Connection", "close")
        conn.putheader("User-Agent", "mmdet-labelstudio-backend")
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        raw = conn.getresponse()
        cut.check("fetching", url, limits)  # headers that ended because we cut them are not headers
    except TaskError:
        close()
        raise
    except ssl.SSLCertVerificationError as exc:
        close()
        raise TaskError("tls_error",
                        f"TLS certificate of {url.redacted()} not accepted: {exc.verify_message}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        close()
        cut.check("fetching", url, limits)
        if isinstance(exc, socket.timeout):
            raise TaskError("timeout", f"{url.redacted()} did not answer within {limits.read_timeout_s:g} s",
                            retriable=True) from None
        if isinstance(exc, http.client.HTTPException):
            raise TaskError("bad_response", f"{url.redacted()} sent a malformed HTTP response: {type(exc).__name__}",
                            retriable=True) from None
        raise TaskError("connection_error", f"cannot fetch {url.redacted()}: {type(exc).__name__}",
                        retriable=True) from None
    return Response(url, raw, cut, close, limits)


def get(
    url: URL,
    *,
    policy: NetworkPolicy,
    limits: FetchLimits,
    hop_headers: Callable[[URL, bool], dict[str, str]] | None = None,
    trusted: Callable[[URL], bool] | None = None,
    deadline: float | None = None,
    cancel: CancelToken | None = None,
) -> Response:
    """GET, following redirects, each hop pinned and checked like the first.

    `trusted(url)` says whether a hop's host is the operator's own (the policy
    lets it through even on a private address); `hop_headers(url,
    chain_trusted)` gives a hop's extra headers, where chain_trusted is False
    once any hop left a trusted host (a foreign server redirecting to Label
    Studio must not get the key sent along).
    """
    if deadline is None:
        deadline = time.monotonic() + limits.total_timeout_s
    current = url
    chain_trusted = True
    for _hop in range(limits.max_redirects + 1):
        is_trusted = bool(trusted and trusted(current))
        chain_trusted = chain_trusted and is_trusted
        headers = hop_headers(current, chain_trusted) if hop_headers else {}
        resp = request(current, policy=policy, limits=limits, trusted_host=is_trusted, headers=headers,
                       deadline=deadline, cancel=cancel)
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.header("Location").strip()
            resp.close()
            if not location:
                raise TaskError("bad_url", f"{current.redacted()} answered a redirect without a Location")
            current = current.join(location)
            continue
        return resp
    raise TaskError("redirect_loop", f"more than {limits.max_redirects} redirects fetching {url.redacted()}")
