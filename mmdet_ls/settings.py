"""Who owns each setting: one place each (docs/configuration.md explains).

- Deployment options (replicas, resources, max_ongoing_requests,
  autoscaling): the serve config file only.
- Application parameters: the typed app args (serve_app.AppArgs) only, with
  environment fallbacks under the names Label Studio ML backend users know.
  Precedence: explicit arg > environment > default.
- Live settings (LIVE_SETTINGS): a deployment's `user_config` in the serve
  config only, so `serve deploy` applies a change in place without reloading
  the model (Ray puts app args into every deployment's version: changing an
  arg restarts every replica). Environment fallback, then default.
- Secrets: the environment (or <NAME>_FILE) only; see credentials.py.
"""
from __future__ import annotations

import os

# Live setting -> the deployment whose user_config owns it.
LIVE_SETTINGS = {
    "score_threshold": "Postprocess",
    "polygon_tolerance_px": "Postprocess",
    "polygon_max_points": "Postprocess",
    "max_batch_size": "Detector",
    "batch_wait_timeout_s": "Detector",
}
# App arg -> environment variables it falls back to (aliases must agree).
# label_studio_url's (LABEL_STUDIO_URL, LABEL_STUDIO_HOSTNAME) are read by
# credentials.label_studio_url_setting, next to its key.
ENV_FALLBACKS = {
    "config_file": ("CONFIG_FILE",),
    "checkpoint_file": ("CHECKPOINT_FILE",),
    "device": ("DEVICE",),
    "image_dir": ("IMAGE_DIR",),
    "basic_auth_user": ("BASIC_AUTH_USER",),
    "log_level": ("LOG_LEVEL",),
    "model_acceleration": ("MODEL_ACCELERATION",),
}
LIVE_ENV_FALLBACKS = {"score_threshold": "SCORE_THRESHOLD"}
SECRET_ENV = {"label_studio_api_key": "LABEL_STUDIO_API_KEY", "basic_auth_pass": "BASIC_AUTH_PASS",
              "jobs_token": "JOBS_TOKEN", "webhook_secret": "WEBHOOK_SECRET"}
DEFAULT_SCORE_THRESHOLD = 0.5


class SettingError(ValueError):
    """A setting in the wrong place, or two places that disagree."""


def env_value(*names: str) -> str | None:
    """The value of the first set variable; aliases set to different values refuse."""
    found = {n: os.environ[n].strip() for n in names if os.environ.get(n, "").strip()}
    if len(set(found.values())) > 1:
        raise SettingError(f"{' and '.join(found)} are both set and differ: set one")
    return next(iter(found.values()), None)


def misplaced_arg_message(name: str) -> str | None:
    """Why `name` is not an app arg, and where it goes instead (None if it may be one)."""
    if name in SECRET_ENV:
        env = SECRET_ENV[name]
        return (f"{name} is a secret and not an app arg (Ray shows app args to anyone with `serve config`): "
                f"set {env} (or {env}_FILE) in the environment of the Ray cluster instead")
    if name in LIVE_SETTINGS:
        env = LIVE_ENV_FALLBACKS.get(name)
        return (f"{name} is a live setting, owned by the {LIVE_SETTINGS[name]} deployment's user_config in the "
                f"serve config (changed there, `serve deploy` applies it without reloading the model); "
                f"or SET={name}=... with make serve" + (f", or {env} in the environment" if env else ""))
    return None


def score_threshold(user_config: dict | None) -> float:
    """The Postprocess threshold: user_config > SCORE_THRESHOLD > 0.5."""
    raw = (user_config or {}).get("score_threshold")
    source = "user_config score_threshold"
    if raw is None:
        raw, source = env_value("SCORE_THRESHOLD"), "SCORE_THRESHOLD"
    if raw is None:
        return DEFAULT_SCORE_THRESHOLD
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingError(f"{source} must be a number between 0 and 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise SettingError(f"{source} must be between 0 and 1, got {value}")
    return value


def polygon_settings(user_config: dict | None) -> tuple[float, int]:
    """The Postprocess's polygon simplification: (tolerance in pixels of the
    image as displayed, most vertices per polygon); see mmdet_ls/masks.py."""
    from .masks import DEFAULT_MAX_POINTS, DEFAULT_TOLERANCE_PX, MAX_POINTS_LIMIT

    user_config = user_config or {}
    tolerance, max_points = user_config.get("polygon_tolerance_px"), user_config.get("polygon_max_points")
    try:
        tolerance = DEFAULT_TOLERANCE_PX if tolerance is None else float(tolerance)
        max_points = DEFAULT_MAX_POINTS if max_points is None else int(max_points)
    except (TypeError, ValueError):
        raise SettingError("Postprocess user_config: polygon_tolerance_px must be a number and polygon_max_points "
                           f"an integer, got {tolerance!r} and {max_points!r}") from None
    if not 0.0 < tolerance <= 100.0 or not 3 <= max_points <= MAX_POINTS_LIMIT:
        raise SettingError(f"Postprocess user_config: polygon_tolerance_px must be in (0, 100] and polygon_max_points "
                           f"3-{MAX_POINTS_LIMIT}, got {tolerance} and {max_points}")
    return tolerance, max_points


def check_user_config(deployment: str, user_config: dict | None) -> dict:
    """A deployment's user_config with only the keys it owns (a typo refuses)."""
    user_config = dict(user_config or {})
    owned = {k for k, owner in LIVE_SETTINGS.items() if owner == deployment}
    unknown = sorted(set(user_config) - owned)
    if unknown:
        raise SettingError(f"{deployment} user_config: unknown setting(s) {unknown}; it takes {sorted(owned)}")
    return user_config
