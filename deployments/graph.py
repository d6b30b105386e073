"""The graph as the ingress and the JobRunner use it: a task's images
through ImageLoader -> Detector -> Postprocess, several images per call
(dispatch.GroupDispatcher), one answer item per task."""
from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from mmdet_ls.failures import TaskFailure
from mmdet_ls.image_sources import LabelStudioAccess
from mmdet_ls.label_config import ParsedLabelConfig
from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import ImageJob, assemble_results, image_source, plan_jobs

from .dispatch import GroupDispatcher
from .image_loader import ImageRequest


class GraphClient:
    def __init__(self, loader: DeploymentHandle, detector: DeploymentHandle, postprocess: DeploymentHandle,
                 max_inflight_images: int, bulk: bool = False):
        self.bulk = bulk  # a job's images: they give way to annotators' at the Detector
        self.loader = loader
        self.detector = detector
        self.postprocess = postprocess
        self.dispatcher = GroupDispatcher(self._send_group, max_inflight_images)

    async def run_image(self, job: ImageJob, access: LabelStudioAccess | None,
                        deadline: float) -> ImageResult | TaskFailure:
        """One image through the graph; every error becomes this task's failure."""
        request = ImageRequest(job.task_id, job.value, access)
        return await self.dispatcher.submit((request, job.targets), image_source(job.value), job.task_id, deadline)

    async def run_jobs(self, jobs: list[ImageJob], access: LabelStudioAccess | None,
                       deadline: float) -> list[ImageResult | TaskFailure]:
        return list(await asyncio.gather(*(self.run_image(job, access, deadline) for job in jobs)))

    async def predict_task(self, task: dict, config: ParsedLabelConfig, access: LabelStudioAccess | None,
                           deadline: float, model_version: str) -> dict:
        """One task's /predict item: a prediction, or an error item."""
        jobs, failures = plan_jobs([task], config)
        outcomes = await self.run_jobs(jobs, access, deadline)
        return assemble_results(1, jobs, outcomes, failures, model_version)[0]

    def _send_group(self, items: list) -> list:
        """One call per deployment for a group of (ImageRequest, targets)."""
        loaded = self.loader.load_group.remote([request for request, _ in items])
        detected = self.detector.detect_group.remote(loaded, bulk=self.bulk) if self.bulk else \
            self.detector.detect_group.remote(loaded)
        return [loaded, detected, self.postprocess.to_regions_group.remote(detected, [t for _, t in items])]
