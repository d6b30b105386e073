"""What request-borne values may look like in a log line."""
from __future__ import annotations

import re

MAX_ID_CHARS = 40


def short_id(task_id) -> str:
    """A task id for log lines: ids come from the request, so keep them short."""
    text = repr(task_id)
    return text if len(text) <= MAX_ID_CHARS else text[:MAX_ID_CHARS] + "..."


def redact_credentials(text: str) -> str:
    """user:password@ in URLs -> ***@."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", text)
