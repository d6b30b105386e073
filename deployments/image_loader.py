"""ImageLoader: fetches and decodes task images; bad images become TaskFailure values."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter
from ray import serve

from mmdet_ls.failures import TaskError, TaskFailure
from mmdet_ls.image_sources import FetchLimits, LabelStudioAuth, fetch_image_bytes
from mmdet_ls.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageDecodeError, decode_image
from mmdet_ls.network_policy import NetworkPolicy

from . import metrics

logger = logging.getLogger("ray.serve")

LOADER_MAX_ONGOING_REQUESTS = 64
MAX_AUTH_ENTRIES = 64  # (Label Studio URL, key) pairs kept; /setup can bring any number
# Images decoded at once per replica. Downloads wait on the network and may
# all run together; a decode of a 89 MP image needs ~0.5 GB, so only a few.
MAX_CONCURRENT_DECODES = 4


def task_label(task_id) -> str:
    """A task id for log lines: ids come from the request, so keep them short."""
    text = repr(task_id)
    return text if len(text) <= 40 else text[:40] + "..."


@dataclass(frozen=True)
class ImageRequest:
    task_id: object
    value: str
    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never logged


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=LOADER_MAX_ONGOING_REQUESTS)
class ImageLoader:
    def __init__(
        self,
        image_dir: str,
        limits: dict | None = None,
        allow_private_networks: bool = False,
        allowed_hosts: list[str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.image_dir = image_dir
        self.limits = FetchLimits(**(limits or {}))
        self.policy = NetworkPolicy(allow_private_networks, tuple(allowed_hosts or ()))
        self.max_image_pixels = max_image_pixels
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc credentials from the environment
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._auth: OrderedDict[tuple[str, str], LabelStudioAuth] = OrderedDict()
        # One thread per request this replica accepts: a slow or trickling
        # server holds its own thread (up to total_timeout_s), never the ones
        # other images need. (asyncio's default pool has cpu_count + 4.)
        self._pool = ThreadPoolExecutor(max_workers=LOADER_MAX_ONGOING_REQUESTS, thread_name_prefix="image-load")
        self._decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)

    def _auth_for(self, url: str | None, key: str | None) -> LabelStudioAuth | None:
        if not url or not key:
            return None
        cache_key = (url, key)
        if cache_key in self._auth:
            self._auth.move_to_end(cache_key)
        else:
            self._auth[cache_key] = LabelStudioAuth(url, key, self.session, self.limits)
            while len(self._auth) > MAX_AUTH_ENTRIES:
                self._auth.popitem(last=False)
        return self._auth[cache_key]

    def _load(self, request: ImageRequest) -> DecodedImage | TaskFailure:
        start = time.perf_counter()
        content_type = ""
        try:
            fetched = fetch_image_bytes(
                request.value,
                image_dir=self.image_dir,
                session=self.session,
                limits=self.limits,
                policy=self.policy,
                label_studio_url=request.label_studio_url,
                auth=self._auth_for(request.label_studio_url, request.api_key),
                task_id=request.task_id,
            )
            content_type = fetched.content_type
            fetched_at = time.perf_counter()
            with self._decode_slots:
                image = decode_image(fetched.data, max_pixels=self.max_image_pixels)
        except TaskError as exc:
            failure = exc.failure
        except ImageDecodeError as exc:
            message = str(exc)
            if content_type and not content_type.lower().startswith("image/"):
                message = f"expected an image but the server sent {content_type.split(';')[0]}: {message}"
            failure = TaskFailure("not_an_image", message)
        except Exception as exc:  # never let one task take the loader down
            logger.exception("unexpected error loading image of task %s", task_label(request.task_id))
            failure = TaskFailure("load_error", f"unexpected error loading the image: {type(exc).__name__}")
        else:
            image.source = fetched.source
            image.timings = {"load_s": fetched_at - start, "decode_s": time.perf_counter() - fetched_at}
            metrics.images_total().inc(tags={"source": fetched.source})
            return image
        logger.warning("task %s: image not loaded (%s): %s", task_label(request.task_id), failure.reason, failure.message)
        return failure

    async def load(self, request: ImageRequest) -> DecodedImage | TaskFailure:
        # Downloads and decoding run in threads so one replica overlaps many.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load, request)
