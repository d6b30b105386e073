"""/health's one-line account of the Detector deployment, from Serve's status.

Serve's message about a deployment may hold a whole traceback (with the
checkpoint URL, credentials, local paths, pids and actor ids): /health shows
a fixed text per kind of problem, never the message itself.
"""
from __future__ import annotations

import builtins
import json
import re

_BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
)
# Exception names in a Serve deployment message: the last line of a traceback
# ("mmdet_ls.model_files.ModelFileError: ...") and Ray's "RayTaskError(Name)";
# not Serve's own wrapper around a failed constructor, "RuntimeError: Traceback ...".
_EXCEPTION_LINE = re.compile(
    r"(?m)^[ \t]*(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))\b(?!: Traceback \(most recent)"
)
_WRAPPED_EXCEPTION = re.compile(r"RayTaskError\(([A-Za-z_]\w*)\)")
_REPLICA_RESOURCES = re.compile(r"Resources required for each replica: (\{[^{}]{0,1000}\})")
_LOG_DETAILS = "details in the Detector replica's log"
_FAILED_TO_START = {
    "DeviceError": "its device setting cannot be honoured where it runs; set device: auto, or reserve a GPU "
                   "with the Detector's ray_actor_options num_gpus",
    "SettingError": "a setting in the serve config is not valid (a misspelt user_config key, a value out of "
                    "range, or max_batch_size above max_ongoing_requests); fix it and deploy again",
    "ModelFileError": "the model files could not be loaded; set checkpoint_file to a local .pth file or make its "
                      "URL reachable, and config_file to a config path or an mmdet config name",
    "ImportError": "a Python package the model needs is not installed on the Detector's node; install "
                   "requirements.txt there (torch, mmcv with its ops, mmdet)",
    "FileNotFoundError": "a file the model needs is missing on the Detector's node; check config_file, "
                         "checkpoint_file and the files the config refers to",
    "CUDA": "the GPU is missing, busy or out of memory; set device: cpu, or give the Detector a free GPU "
            "(ray_actor_options num_gpus) and a smaller max_batch_size",
    "RuntimeError": "the model could not be built from config_file and checkpoint_file (e.g. a checkpoint "
                    "saved for another config); check that they belong together",
}


def _replica_resources(message: str) -> str:
    """What one replica asks for, rebuilt from numbers only (never echoed)."""
    match = _REPLICA_RESOURCES.search(message)
    try:
        asked = json.loads(match.group(1)) if match else None
    except ValueError:
        asked = None
    if not isinstance(asked, dict):
        return "its ray_actor_options"
    clean = {k: v for k, v in list(asked.items())[:8]
             if isinstance(k, str) and re.fullmatch(r"[A-Za-z][\w.:-]{0,39}", k)
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return json.dumps(clean) if clean else "its ray_actor_options"


def describe_detector_message(message: str, status: str) -> tuple[str, str | None, str]:
    """(detail for /health, warning or None, what to log the message as):
    a fixed text per kind of problem, never the message itself."""
    names = [n for n in _WRAPPED_EXCEPTION.findall(message) + _EXCEPTION_LINE.findall(message)
             if n != "RayTaskError"]
    if names or "Traceback" in message or "failed to start" in message:
        raised = names[-1] if names else ""  # a traceback ends with what was raised
        if raised == "ModelFileError":
            key, shown = "ModelFileError", raised
        elif raised in ("ImportError", "ModuleNotFoundError"):
            key, shown = "ImportError", raised
        elif raised in ("DeviceError", "SettingError"):
            key, shown = raised, raised
        elif raised == "FileNotFoundError":
            key, shown = "FileNotFoundError", raised
        elif "CUDA" in message and raised in ("RuntimeError", "AssertionError", "OutOfMemoryError",
                                              "AcceleratorError"):
            key, shown = "CUDA", "CUDA error"
        elif raised == "RuntimeError":
            key, shown = "RuntimeError", raised
        else:
            key, shown = None, raised if raised in _BUILTIN_EXCEPTIONS else "an unexpected error"
        what = f"{_FAILED_TO_START[key]}; " if key else ""
        return f"the Detector failed to start ({shown}): {what}{_LOG_DETAILS}", None, "Detector failed to start"
    if "to be scheduled" in message or "Resources required" in message:
        return (
            "the Detector's replicas are waiting to be scheduled: each needs "
            f"{_replica_resources(message)} and no node has that free (e.g. no free GPU); add a node, "
            "or lower the Detector's ray_actor_options",
            "detector replicas are pending for resources (e.g. no node with a free GPU)",
            "Detector replicas pending for resources",
        )
    if "to initialize" in message:
        return ("the Detector is still starting: loading the model takes a while (a checkpoint download, "
                "a big model); /health says ready once it runs", None, "Detector slow to start")
    if "health check" in message:
        return (f"a Detector replica failed its health check and is being replaced; {_LOG_DETAILS}", None,
                "Detector health check failed")
    return (f"the Detector is not ready ({status}); details in the Serve controller's log", None,
            "Detector not ready")


def detector_health(detector) -> tuple[dict, str | None]:
    """/health fields from Serve's DeploymentStatus of the Detector (status,
    replica_states, message), and the heading to log its message under
    (None: no message)."""
    states = {str(getattr(k, "value", k)): v for k, v in detector.replica_states.items()}
    running = states.get("RUNNING", 0)
    health = {"ready": running > 0, "detector_status": str(getattr(detector.status, "value", detector.status)),
              "detector_replicas": states}
    heading = None
    if detector.message:
        detail, warning, heading = describe_detector_message(detector.message, health["detector_status"])
        health["detail"] = detail
        if warning:
            health["warning"] = warning
    elif not running:
        # Ray names unschedulable replicas only after 30 s; until then either may be true.
        health["detail"] = "detector replicas are starting: loading the model, or waiting for resources"
    return health, heading
