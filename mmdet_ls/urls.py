"""One parse of every URL the backend connects to.

`parse_url` is the only reader of URL text: its `URL` drives the origin check,
the network policy and the connection itself (`mmdet_ls.http_fetch` connects to
`URL.host`/`URL.port` and sends `URL.target`), so no second parser can read
the same text differently. Text that parsers are known to disagree on
(backslashes, control characters, several '@', whitespace or non-ASCII in the
authority, odd numeric hosts) is refused instead of guessed at; after our
parse, the normalized text is read once more by urllib and urllib3 and must
give the same host and port, or it is refused too.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .failures import TaskError

MAX_URL_LENGTH = 64 * 1024
MAX_QUOTED = 200  # characters of a (redacted) URL quoted back in a message
DEFAULT_PORTS = {"http": 80, "https": 443}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_.])?$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
# What may stay as it is in a path or query (RFC 3986 pchar + "/" + "?");
# everything else (spaces, quotes, non-ASCII, ...) is percent-encoded.
_SAFE_TARGET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
)
_HEX = frozenset("0123456789abcdefABCDEF")


class URLError(TaskError):
    def __init__(self, message: str):
        super().__init__("bad_url", message)


@dataclass(frozen=True)
class URL:
    """An http(s) URL as the backend will connect to it."""

    scheme: str  # "http" or "https"
    host: str  # lower-case: a DNS name, a dotted IPv4 address, or an IPv6 address without brackets
    port: int
    target: str  # percent-encoded path and query, starts with "/"
    userinfo: str | None = field(default=None, repr=False)  # "user:password" as written, if any

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def without_userinfo(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"

    def redacted(self) -> str:
        """For messages and logs: no user:password, no query (it may carry a signature)."""
        text = f"{self.scheme}://{self.host_header}{self.path}"
        return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."

    def join(self, reference: str) -> URL:
        """Resolve a redirect Location (absolute or relative) against this URL."""
        _check_text(reference)
        if _SCHEME_RE.match(reference):
            return parse_url(reference)
        if reference.startswith("//"):
            return parse_url(f"{self.scheme}:{reference}")
        reference = reference.split("#", 1)[0]
        if reference.startswith("/"):
            target = reference
        elif reference.startswith("?"):
            target = self.path + reference
        elif not reference:
            target = self.target
        else:
            target = self.path.rsplit("/", 1)[0] + "/" + reference
        return parse_url(f"{self.scheme}://{self.host_header}{target}")


def redact_text(text: str) -> str:
    """A string that may be (half) a URL, fit for a message: no userinfo, no
    query or fragment, no control characters, not too long."""
    if not isinstance(text, str):
        return repr(type(text).__name__)
    text = re.split(r"[?#]", text, maxsplit=1)[0]
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//([^/]*)(.*)$", text, re.S)
    if match and "@" in match.group(2):
        text = f"{match.group(1) or ''}//{match.group(2).rsplit('@', 1)[1]}{match.group(3)}"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = repr(text)[1:-1]  # control characters and backslashes visible, never raw
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise URLError(f"URL must be text, got {type(text).__name__}")
    if len(text) > MAX_URL_LENGTH:
        raise URLError(f"URL is longer than {MAX_URL_LENGTH // 1024} KiB")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise URLError(f"URL contains control characters: '{redact_text(text)}'")
    if "\\" in text:
        raise URLError(f"URL contains a backslash, which URL parsers read differently: '{redact_text(text)}'")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise URLError("URL is not valid Unicode text") from None


def _encode_target(raw: str) -> str:
    out = []
    for i, c in enumerate(raw):
        if c == "%":
            out.append(c if raw[i + 1:i + 2] in _HEX and raw[i + 2:i + 3] in _HEX and len(raw) > i + 2 else "%25")
        elif c in _SAFE_TARGET:
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on the path as written."""
    output: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                output.append("")
        elif seg == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(seg)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def _parse_host(raw: str, original: str) -> str:
    if raw.startswith("["):
        if not raw.endswith("]") or "%" in raw:  # no zone ids ("%eth0"): they name a local interface
            raise URLError(f"URL has a malformed IPv6 host: '{redact_text(original)}'")
        try:
            return str(ipaddress.IPv6Address(raw[1:-1]))
        except ValueError:
            raise URLError(f"URL has a malformed IPv6 host: '{redact_text(original)}'") from None
    if not raw:
        raise URLError(f"URL has no host: '{redact_text(original)}'")
    if not raw.isascii():
        raise URLError(f"URL host is not ASCII (use its xn-- form): '{redact_text(original)}'")
    host = raw.lower()
    if not _HOST_RE.match(host) or ".." in host:
        raise URLError(f"URL has an invalid host: '{redact_text(original)}'")
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL_RE.match(last_label):
        # "127.1", "0x7f.0.0.1", "2130706433": numeric forms that resolvers
        # and parsers read differently; only plain dotted quads are taken.
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise URLError(
                f"URL has an ambiguous numeric host (write it as a.b.c.d): '{redact_text(original)}'") from None
    return host


def parse_url(text: str, schemes: tuple[str, ...] = ("http", "https")) -> URL:
    """The one parse of `text`; URLError (a TaskError, reason bad_url) when it
    is not an absolute http(s) URL that every parser reads the same way."""
    _check_text(text)
    text = text.strip(" ")
    match = _SCHEME_RE.match(text)
    if not match:
        raise URLError(f"not an absolute URL: '{redact_text(text)}'")
    scheme = match.group(1).lower()
    if scheme not in schemes:
        raise URLError(f"unsupported URL scheme '{redact_text(scheme[:20])}': only {' and '.join(schemes)} are fetched")
    rest = text[match.end():]
    if not rest.startswith("//"):
        raise URLError(f"URL has no host: '{redact_text(text)}'")
    rest = rest[2:]
    end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))
    authority, target = rest[:end], rest[end:].split("#", 1)[0]
    if any(c.isspace() for c in authority):
        raise URLError(f"URL has whitespace in its host: '{redact_text(text)}'")
    userinfo = None
    if "@" in authority:
        if authority.count("@") > 1:
            raise URLError(f"URL has more than one '@' before its host: '{redact_text(text)}'")
        userinfo, authority = authority.split("@")
    if authority.startswith("["):
        close = authority.find("]")
        host_raw, port_raw = (authority[:close + 1], authority[close + 1:]) if close >= 0 else (authority, "")
        if port_raw and not port_raw.startswith(":"):
            raise URLError(f"URL has a malformed IPv6 host: '{redact_text(text)}'")
        port_raw = port_raw[1:] if port_raw else None
    elif ":" in authority:
        host_raw, port_raw = authority.split(":", 1)
        if ":" in port_raw:
            raise URLError(f"URL has more than one ':' in its host: '{redact_text(text)}'")
    else:
        host_raw, port_raw = authority, None
    host = _parse_host(host_raw, text)
    if port_raw:
        if not _PORT_RE.match(port_raw) or not 0 < int(port_raw) < 65536:
            raise URLError(f"URL has an invalid port: '{redact_text(text)}'")
        port = int(port_raw)
    else:
        port = DEFAULT_PORTS[scheme]
    path, sep, query = _encode_target(target).partition("?")
    target = _remove_dot_segments(path or "/") + sep + query
    url = URL(scheme, host, port, target, userinfo)
    _cross_check(url, text)
    return url


def _cross_check(url: URL, original: str) -> None:
    """urllib and urllib3 (what requests uses) must read the normalized URL
    as we do; any disagreement is a parser differential, refused."""
    normalized = url.without_userinfo()
    try:
        theirs = urlsplit(normalized)
        seen = [(theirs.scheme, theirs.hostname, theirs.port or DEFAULT_PORTS.get(theirs.scheme))]
        try:
            from urllib3.util import parse_url as urllib3_parse

            u3 = urllib3_parse(normalized)
            seen.append((u3.scheme, (u3.host or "").strip("[]").lower(), u3.port or DEFAULT_PORTS.get(u3.scheme)))
        except ImportError:
            pass
    except ValueError:
        seen = [None]
    for reading in seen:
        if reading is None or reading[0] != url.scheme or reading[2] != url.port or (
            reading[1] or ""
        ).lower() != url.host.lower():
            raise URLError(f"URL is read differently by different parsers: '{redact_text(original)}'")


def decoded_path_segments(url: URL) -> list[str]:
    """The path's segments after percent-decoding, for checks on what a server
    (which decodes) will see."""
    return unquote(url.path).split("/")
