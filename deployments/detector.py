"""Detector: an MMDetection model on a reserved CPU/GPU, with dynamic batching."""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from mmdet_ls.failures import TaskFailure
from mmdet_ls.images import DecodedImage
from mmdet_ls.regions import Detections

from . import metrics

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01


def replica_cpu_count() -> int:
    """Whole CPUs Ray reserved for this replica (at least 1)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        cpus = 1
    return max(1, int(cpus))


def limit_threads(threads: int) -> None:
    # More compute threads than owned cores made CPU latency 5-10x worse here.
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    user_config={"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_TIMEOUT_S},
)
class Detector:
    def __init__(
        self,
        config_file: str,
        checkpoint_file: str,
        device: str = "cpu",
        torch_threads: int | None = None,
        stack_batches: bool | None = None,
        checkpoint_sha256: str | None = None,
    ):
        from mmdet_ls.inference import BatchDetector
        from mmdet_ls.model_files import resolve_checkpoint_file, resolve_config_file

        self.threads = torch_threads or replica_cpu_count()
        limit_threads(self.threads)
        started = time.perf_counter()
        self.loaded_at = time.time()
        self.runner = BatchDetector(
            resolve_config_file(config_file),
            resolve_checkpoint_file(checkpoint_file, checkpoint_sha256=checkpoint_sha256),
            device,
        )
        # One model call per batch pays off on a GPU; on a CPU images run one by
        # one inside the batch (a stacked CPU batch measured slower per image).
        self.stack_batches = self.runner.device != "cpu" if stack_batches is None else stack_batches
        logger.info(
            "Detector ready on %s (%d threads, stacked batches: %s, classes: %d) in %.1f s",
            self.runner.device, self.threads, self.stack_batches, len(self.runner.class_names),
            time.perf_counter() - started,
        )

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings change at run time, without reloading the model."""
        self.max_batch_size = int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.batch_wait_timeout_s = float(user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S))
        self.detect_batch.set_max_batch_size(self.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def info(self) -> dict:
        return {
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "loaded_at": self.loaded_at,
            "device": self.runner.device,
            "classes": list(self.runner.class_names),
            "threads": self.threads,
            "stack_batches": self.stack_batches,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
        }

    async def detect(self, image: DecodedImage | TaskFailure) -> Detections | TaskFailure:
        if isinstance(image, TaskFailure):
            return image  # failed upstream: pass it on, never into a batch
        queued = time.perf_counter()
        result = await self.detect_batch(image)
        if isinstance(result, Detections):
            result.timings.update(image.timings)
            result.timings["queue_and_model_s"] = time.perf_counter() - queued
        return result

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def detect_batch(self, images: list[DecodedImage]) -> list[Detections | TaskFailure]:
        metrics.batch_size_histogram().observe(len(images))
        # The model runs in a thread so the replica keeps accepting requests
        # and the next batch fills while this one computes.
        return await asyncio.to_thread(self.runner.detect, [i.bgr for i in images], self.stack_batches)
