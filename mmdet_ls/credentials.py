"""The backend's secrets and which host each may go to.

Secrets (the Label Studio key, the basic-auth password) are read from the
environment, or from a file named by `<NAME>_FILE` (a mounted Kubernetes or
Docker secret), by the replica that uses them: never from application args,
which Ray shows to anyone with `serve config`, `serve status` or the dashboard.

A key travels only with its own host: the operator's key with the operator's
Label Studio URL, a `/setup` token with the hostname of that same `/setup`.
"""
from __future__ import annotations

import os

from .image_sources import LabelStudioAccess
from .urls import URLError

MAX_SETUP_HOSTNAME_CHARS = 2048
MAX_SECRET_FILE_BYTES = 16 * 1024


class ConfigError(ValueError):
    """A setting is missing or contradicts another; the message says which."""


def read_secret(*names: str) -> str | None:
    """The first of `names` set in the environment, or in the file its
    `<NAME>_FILE` names; aliases that are both set must agree."""
    found: dict[str, str] = {}
    for name in names:
        value = os.environ.get(name)
        path = os.environ.get(f"{name}_FILE")
        if value and path:
            raise ConfigError(f"both {name} and {name}_FILE are set: set one")
        if path:
            try:
                with open(path, "rb") as f:
                    value = f.read(MAX_SECRET_FILE_BYTES + 1).decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{name}_FILE cannot be read: {type(exc).__name__}") from None
        if value:
            found[name] = value.strip()
    if len(set(found.values())) > 1:
        raise ConfigError(f"{' and '.join(found)} are both set and differ: set one")
    return next(iter(found.values()), None)


def label_studio_url_setting(arg: str | None) -> str | None:
    """The operator's Label Studio URL: the app arg, else LABEL_STUDIO_URL /
    LABEL_STUDIO_HOSTNAME (which must agree when both are set)."""
    env = {n: os.environ[n].strip().rstrip("/") for n in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOSTNAME")
           if os.environ.get(n, "").strip()}
    if len(set(env.values())) > 1:
        raise ConfigError("LABEL_STUDIO_URL and LABEL_STUDIO_HOSTNAME are both set and differ: set one")
    return arg or next(iter(env.values()), None)


def operator_access(label_studio_url: str | None) -> LabelStudioAccess | None:
    """The operator's Label Studio and its key (LABEL_STUDIO_API_KEY, alias
    LABEL_STUDIO_ACCESS_TOKEN). A key without a URL refuses to start."""
    key = read_secret("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")
    url = label_studio_url_setting(label_studio_url)
    if key and not url:
        raise ConfigError(
            "LABEL_STUDIO_API_KEY is set but no Label Studio URL is: set LABEL_STUDIO_URL (or the "
            "label_studio_url arg) to the Label Studio this key belongs to; the key is sent nowhere else"
        )
    if not url:
        return None
    try:
        return LabelStudioAccess.from_text(url, key)
    except URLError as exc:
        raise ConfigError(f"the Label Studio URL is not usable: {exc.failure.message}") from None
    except ValueError as exc:
        raise ConfigError(f"LABEL_STUDIO_API_KEY: {exc}") from None


def basic_auth_setting(user_arg: str | None) -> tuple[str, str] | None:
    """(user, password) when basic auth is on; both or neither must be set."""
    user = user_arg or os.environ.get("BASIC_AUTH_USER") or None
    password = read_secret("BASIC_AUTH_PASS")
    if bool(user) != bool(password):
        missing = "BASIC_AUTH_PASS" if user else "BASIC_AUTH_USER (or the basic_auth_user arg)"
        raise ConfigError(f"basic auth needs both a user and a password: {missing} is not set")
    return (user, password) if user else None


def jobs_token_setting() -> str | None:
    """JOBS_TOKEN: a bearer token for the /jobs API (besides basic auth)."""
    token = read_secret("JOBS_TOKEN")
    if token is not None and len(token) < 16:
        raise ConfigError("JOBS_TOKEN must be at least 16 characters")
    return token


def webhook_secret_setting() -> str | None:
    """WEBHOOK_SECRET: what Label Studio's webhook must carry when basic auth is on."""
    secret = read_secret("WEBHOOK_SECRET")
    if secret is not None and len(secret) < 16:
        raise ConfigError("WEBHOOK_SECRET must be at least 16 characters")
    return secret


def setup_access(hostname, token) -> LabelStudioAccess | None:
    """What a /setup call hands over, validated; ValueError for bad values."""
    if hostname in (None, "") and token in (None, ""):
        return None
    if not isinstance(hostname, str) or not hostname.strip():
        raise ValueError('"hostname" must be the Label Studio URL when "access_token" is sent')
    if len(hostname) > MAX_SETUP_HOSTNAME_CHARS:
        raise ValueError(f'"hostname" is longer than {MAX_SETUP_HOSTNAME_CHARS} characters')
    if token not in (None, "") and not isinstance(token, str):
        raise ValueError('"access_token" must be a string')
    try:
        return LabelStudioAccess.from_text(hostname, token or None)
    except URLError as exc:
        raise ValueError(f'"hostname" is not an http(s) URL: {exc.failure.message}') from None
    except ValueError:
        raise ValueError('"access_token" is not a Label Studio token') from None


def access_for(operator: LabelStudioAccess | None, setup: LabelStudioAccess | None) -> LabelStudioAccess | None:
    """Which Label Studio (and key) a project's images are fetched with.

    The operator's key wins (Label Studio's /setup sends the creator's legacy
    token, which fails when legacy tokens are off, the default). Without an
    operator key, a /setup token is used only with its own hostname, and only
    when that is the operator's Label Studio (if one is set).
    """
    if operator is not None and operator.api_key:
        return operator
    if setup is None:
        return operator
    if operator is not None and not operator.owns(setup.base):
        return operator
    return setup
