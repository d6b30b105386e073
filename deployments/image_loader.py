"""ImageLoader: fetches and decodes task images; bad images become TaskFailure values."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray import serve

from mmdet_ls.failures import TaskError, TaskFailure
from mmdet_ls.http_fetch import CancelToken, FetchLimits
from mmdet_ls.image_sources import LabelStudioAccess, LabelStudioAuth, fetch_image_bytes
from mmdet_ls.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageDecodeError, decode_image
from mmdet_ls.log_text import short_id
from mmdet_ls.lru import BoundedLRU
from mmdet_ls.network_policy import NetworkPolicy

from . import metrics

logger = logging.getLogger("ray.serve")

# Calls at once per replica; a call carries up to dispatch.MAX_IMAGES_PER_CALL
# images, which wait for one of LOADER_THREADS threads.
LOADER_MAX_ONGOING_REQUESTS = 64
LOADER_THREADS = 64
MAX_AUTH_ENTRIES = 64  # (Label Studio origin, key) pairs kept; /setup can bring any number
# Images decoded at once per replica. Downloads wait on the network and may
# all run together; a decode of a 89 MP image needs ~0.5 GB, so only a few.
MAX_CONCURRENT_DECODES = 4


@dataclass(frozen=True)
class ImageRequest:
    task_id: object
    value: str
    # Where Label Studio is, with the key that may go there and nowhere else.
    access: LabelStudioAccess | None = field(default=None, repr=False)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=LOADER_MAX_ONGOING_REQUESTS)
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
        # Shared by the loading threads (a PAT exchange holds its own lock
        # inside LabelStudioAuth).
        self._auth: BoundedLRU[tuple, LabelStudioAuth] = BoundedLRU(MAX_AUTH_ENTRIES)
        # Many threads: a slow or trickling server holds its own thread (up to
        # total_timeout_s), not the ones other images need. (asyncio's default
        # pool has cpu_count + 4.)
        self._pool = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="image-load")
        self._decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)

    def _auth_for(self, access: LabelStudioAccess | None) -> LabelStudioAuth | None:
        if access is None or not access.api_key:
            return None
        return self._auth.get_or_create(
            (access.base, access.api_key), lambda: LabelStudioAuth(access, self.limits, self.policy)
        )

    def _load(self, request: ImageRequest, cancel: CancelToken) -> DecodedImage | TaskFailure:
        start = time.perf_counter()
        content_type = ""
        try:
            fetched = fetch_image_bytes(
                request.value,
                image_dir=self.image_dir,
                limits=self.limits,
                policy=self.policy,
                access=request.access,
                auth=self._auth_for(request.access),
                task_id=request.task_id,
                cancel=cancel,
            )
            cancel.check()
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
            logger.exception("unexpected error loading image of task %s", short_id(request.task_id))
            failure = TaskFailure("load_error", f"unexpected error loading the image: {type(exc).__name__}")
        else:
            image.source = fetched.source
            image.timings = {"load_s": fetched_at - start, "decode_s": time.perf_counter() - fetched_at}
            metrics.images_total().inc(tags={"source": fetched.source})
            return image
        logger.warning("task %s: image not loaded (%s): %s", short_id(request.task_id), failure.reason, failure.message)
        return failure

    async def load_group(self, requests: list[ImageRequest]) -> list[DecodedImage | TaskFailure]:
        """Several images per call (fewer hops per image), loaded concurrently
        in threads. A cancelled call (its /predict ran out of time) shuts its
        sockets at once, so the threads are free for the next request."""
        loop = asyncio.get_running_loop()
        cancels = [CancelToken() for _ in requests]
        try:
            return list(await asyncio.gather(*(loop.run_in_executor(self._pool, self._load, request, cancel)
                                               for request, cancel in zip(requests, cancels, strict=True))))
        except asyncio.CancelledError:
            for cancel in cancels:
                cancel.cancel()
            raise
