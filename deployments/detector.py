"""Detector: an MMDetection model on a reserved CPU/GPU, with dynamic batching."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from mmdet_ls.failures import TaskFailure
from mmdet_ls.images import DecodedImage
from mmdet_ls.regions import Detections
from mmdet_ls.settings import SettingError, check_user_config

from . import metrics
from .dispatch import MAX_IMAGES_PER_CALL

logger = logging.getLogger("ray.serve")

# Batching defaults per device, from measurement: a stacked batch on the CPU
# ran slower per image than single images (bench/results/20261129-022539-cpu.json),
# so the CPU "batch" is a small queue drained one image at a time, with no
# waiting for company (batches still form from requests queued while the
# model runs); on a GPU one call for many images is the throughput. The
# Detector's user_config in the serve config overrides them, live.
BATCH_DEFAULTS = {"cpu": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
                  "cuda": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}}


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def replica_cpu_count() -> int:
    """Torch threads for this replica: the CPUs Ray reserved for it, rounded
    to whole CPUs (at least 1), never more than the cores it may run on."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        cpus = 1
    return max(1, min(round(cpus), usable_cores()))


def limit_threads(threads: int) -> None:
    # More busy compute threads than owned cores made CPU latency several times worse.
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# The model thread (and the OpenMP workers it starts, which inherit it) runs
# at a lower CPU priority than the replicas' request handling: when the model
# keeps every core busy, /health and the graph's light per-request work still
# get a core at once (Label Studio gives /health 1 s). The model loses little:
# the others' CPU is small and would be spent anyway.
MODEL_THREAD_NICE = 5


def _start_model_thread(threads: int) -> None:
    limit_threads(threads)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + MODEL_THREAD_NICE))
    except (AttributeError, OSError):  # Linux: this thread only; elsewhere best effort
        pass


def model_thread(threads: int) -> ThreadPoolExecutor:
    """The one thread the model runs in. OpenMP's thread count is a per-thread
    setting (a thread started later gets OMP_NUM_THREADS, which Ray sets from
    the reservation at worker start), so it is set in that thread itself."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=_start_model_thread,
                              initargs=(threads,))


@serve.deployment(max_ongoing_requests=16)  # CPUs: serve_app.build_app
class Detector:
    def __init__(
        self,
        config_file: str,
        checkpoint_file: str,
        device: str = "auto",
        allow_cpu_fallback: bool = False,
        torch_threads: int | None = None,
        stack_batches: bool | None = None,
        checkpoint_sha256: str | None = None,
        acceleration: str = "eager",
    ):
        from mmdet_ls.inference import BatchDetector
        from mmdet_ls.model_files import resolve_checkpoint_file, resolve_config_file

        self.threads = torch_threads or replica_cpu_count()
        limit_threads(self.threads)
        self._model_thread = model_thread(self.threads)
        started = time.perf_counter()
        self.loaded_at = time.time()
        # Built (weights, warm-up, acceleration timing) in the model thread too,
        # so the process has one OpenMP team: libgomp counts every thread's
        # idle team against the cores, and past that its workers sleep between
        # regions instead of spinning (bench/omp_threads.py measures it; on this
        # machine its runs were too noisy to show a difference: docs/performance.md).
        self.runner = self._model_thread.submit(
            BatchDetector,
            resolve_config_file(config_file),
            resolve_checkpoint_file(checkpoint_file, checkpoint_sha256=checkpoint_sha256),
            device,
            allow_cpu_fallback,
            acceleration,
        ).result()
        self._bulk_gate = asyncio.Condition()  # made in the replica's event loop's thread, used only there
        self._bulk_queued = 0
        self.reconfigure(None)  # the per-device defaults until a user_config says otherwise
        # One model call per batch pays off on a GPU; on a CPU images run one by
        # one inside the batch (a stacked CPU batch measured slower per image).
        self.stack_batches = self.runner.device != "cpu" if stack_batches is None else stack_batches
        accel = self.runner.acceleration_report
        logger.info(
            "Detector ready on %s (%d threads, stacked batches: %s, classes: %d, acceleration: %s) in %.1f s",
            self.runner.device, self.threads, self.stack_batches, len(self.runner.class_names),
            f"{accel['mode']}: {accel['reason']}" if accel.get("reason") else accel["mode"],
            time.perf_counter() - started,
        )

    def reconfigure(self, user_config: dict | None) -> None:
        """Batch settings change at run time, without reloading the model."""
        settings = {**BATCH_DEFAULTS["cpu" if self.runner.device == "cpu" else "cuda"],
                    **check_user_config("Detector", user_config)}
        max_batch_size, wait_s = int(settings["max_batch_size"]), float(settings["batch_wait_timeout_s"])
        if not 1 <= max_batch_size <= 512 or not 0.0 <= wait_s <= 10.0:
            raise SettingError(f"Detector user_config: max_batch_size must be 1-512 and batch_wait_timeout_s "
                               f"0-10 s, got {max_batch_size} and {wait_s}")
        ongoing = self._max_ongoing_requests()
        if ongoing is not None and max_batch_size > ongoing * MAX_IMAGES_PER_CALL:
            raise SettingError(f"Detector user_config: max_batch_size {max_batch_size} is above what the Detector's "
                               f"max_ongoing_requests {ongoing} calls of up to {MAX_IMAGES_PER_CALL} images can "
                               "hold, so batches could never fill; raise max_ongoing_requests in the serve config")
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, wait_s
        self.detect_batch.set_max_batch_size(max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(wait_s)

    @staticmethod
    def _max_ongoing_requests() -> int | None:
        try:  # Serve's private replica context: the deployment options in force
            return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
        except Exception:
            return None

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
            "acceleration": self.runner.acceleration_report,
            "compile_count": self.runner.compile_count(),
        }

    async def detect_group(self, images: list[DecodedImage | TaskFailure],
                           bulk: bool = False) -> list[Detections | TaskFailure]:
        """Several images per call (fewer hops per image); each still goes
        through the batch queue on its own, and fails on its own. `bulk`
        (a job's images): at most one batch of them in the batch queue, the
        rest wait here, so an annotator's image waits for at most the batch
        that is running, not for a job's backlog."""
        one = self._detect_bulk if bulk else self._detect_one
        results = await asyncio.gather(*(one(image) for image in images), return_exceptions=True)
        return [r if not isinstance(r, BaseException) else
                TaskFailure("model_error", f"model failed on this image: {type(r).__name__}") for r in results]

    async def _detect_bulk(self, image: DecodedImage | TaskFailure) -> Detections | TaskFailure:
        if isinstance(image, TaskFailure):
            return image
        async with self._bulk_gate:
            await self._bulk_gate.wait_for(lambda: self._bulk_queued < self.max_batch_size)
            self._bulk_queued += 1
        try:
            return await self._detect_one(image)
        finally:
            async with self._bulk_gate:
                self._bulk_queued -= 1
                self._bulk_gate.notify_all()

    async def _detect_one(self, image: DecodedImage | TaskFailure) -> Detections | TaskFailure:
        if isinstance(image, TaskFailure):
            return image  # failed upstream: pass it on, never into a batch
        queued = time.perf_counter()
        result = await self.detect_batch(image)
        if isinstance(result, Detections):
            result.timings.update(image.timings)
            result.timings["queue_and_model_s"] = time.perf_counter() - queued
        return result

    @serve.batch(max_batch_size=BATCH_DEFAULTS["cpu"]["max_batch_size"],
                 batch_wait_timeout_s=BATCH_DEFAULTS["cpu"]["batch_wait_timeout_s"])
    async def detect_batch(self, images: list[DecodedImage]) -> list[Detections | TaskFailure]:
        metrics.batch_size_histogram().observe(len(images))
        # The model runs in its own thread so the replica keeps accepting
        # requests and the next batch fills while this one computes.
        return await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self.runner.detect, [i.bgr for i in images], self.stack_batches)
