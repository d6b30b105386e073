"""The production graph with a model that sleeps a fixed time per image and uses no CPU.

Bench-only (`import_path: bench.slow_app:build_app`, SLOW_PER_IMAGE_S in the
environment): how work spreads over the Detector replicas can then be read
from wall time alone, with no model noise (bench/routing_balance.py).
"""
import os
import time

from bench.noop_app import NoopBatchDetector, NoopDetector, build_app_with


class SleepingBatchDetector(NoopBatchDetector):
    def detect(self, images, stacked=True):
        time.sleep(float(os.environ.get("SLOW_PER_IMAGE_S", "0.5")) * len(images))
        return super().detect(images, stacked)


class SleepingDetector(NoopDetector):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runner = SleepingBatchDetector()


def build_app(args):
    return build_app_with(SleepingDetector, args)
