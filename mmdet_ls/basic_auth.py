"""HTTP Basic credentials checked against the configured (user, password)."""
from __future__ import annotations

import base64
import binascii
import hmac


def basic_auth_ok(header: str, expected: tuple[str, str | None] | None) -> bool:
    """Whether an Authorization header carries `expected`; anything goes when
    `expected` is None (basic auth off)."""
    if not expected:
        return True
    # The scheme is case-insensitive (RFC 7235): "basic" and "BASIC" are Basic too.
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the header
        return False
    user, _, password = decoded.partition(b":")
    # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500).
    user_ok = hmac.compare_digest(user, expected[0].encode("utf-8"))
    pass_ok = hmac.compare_digest(password, (expected[1] or "").encode("utf-8"))
    return user_ok and pass_ok


def bearer_ok(header: str, token: str | None) -> bool:
    """Whether an Authorization header is `Bearer <token>` (never when no token is set)."""
    if not token:
        return False
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))
