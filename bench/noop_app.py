"""The production graph with the detector's model call replaced by a no-op.

Bench-only (`import_path: bench.noop_app:build_app`): it measures what the
serving graph itself costs per request.
"""
import asyncio

import numpy as np

import serve_app
from deployments.detector import Detector, model_thread
from mmdet_ls.regions import Detections


class NoopBatchDetector:
    device = "cpu"
    class_names = ["car"]
    acceleration_report = {"mode": "eager"}

    def compile_count(self) -> int:
        return 0

    def detect(self, images, stacked=True):
        return [
            Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), [], im.shape[1], im.shape[0])
            for im in images
        ]


class NoopDetector(Detector.func_or_class):
    def __init__(self, *args, **kwargs):
        import time

        self.threads = 1
        self._model_thread = model_thread(1)
        self.loaded_at = time.time()
        self.runner = NoopBatchDetector()
        self.stack_batches = False
        self._bulk_gate = asyncio.Condition()
        self._bulk_queued = 0
        self.reconfigure(None)


def build_app_with(detector_class, args):
    """serve_app.build_app with `detector_class` as the Detector's class."""
    serve_app.Detector = Detector.options(func_or_class=detector_class)
    try:
        return serve_app.build_app(args)
    finally:
        serve_app.Detector = Detector


def build_app(args):
    return build_app_with(NoopDetector, args)
