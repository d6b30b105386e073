"""The Detector's state for the ingress's /health, read from serve.status()."""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from mmdet_ls.health import detector_health
from mmdet_ls.log_text import redact_credentials

logger = logging.getLogger("ray.serve")

HEALTH_REFRESH_S = 2.0
FIRST_CHECK_WAIT_S = 0.5  # well inside Label Studio's 1 s limit on /health


class DetectorHealth:
    """serve.status() is a call to the controller: it runs in a thread, in the
    background, at most every HEALTH_REFRESH_S; /health answers from the
    last result."""

    def __init__(self):
        self._health: dict = {"ready": False, "detail": "checking the detector"}
        self._checked = 0.0
        self._task: asyncio.Task | None = None
        self._logged_detail: str | None = None
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:
            self.app_name = None

    async def current(self) -> dict:
        if time.monotonic() - self._checked > HEALTH_REFRESH_S and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._refresh())
        if self._checked == 0.0 and self._task is not None:
            await asyncio.wait([self._task], timeout=FIRST_CHECK_WAIT_S)
        return self._health

    async def _refresh(self) -> None:
        try:
            self._health = await asyncio.to_thread(self._read)
        except Exception as exc:
            self._health = {"ready": False, "detail": f"cannot read serve status: {type(exc).__name__}"}
        self._checked = time.monotonic()

    def _read(self) -> dict:
        status = serve.status()
        app_status = status.applications.get(self.app_name) if self.app_name else None
        if app_status is None:
            return {"ready": False, "detail": "application status unknown"}
        detector = app_status.deployments.get("Detector")
        if detector is None:
            return {"ready": False, "detail": "no Detector deployment"}
        health, heading = detector_health(detector)
        # The message itself (maybe a whole traceback) goes to this replica's
        # log, once per /health detail.
        if heading and self._logged_detail != health["detail"]:
            self._logged_detail = health["detail"]
            logger.warning("%s: %s", heading, redact_credentials(detector.message))
        return health
