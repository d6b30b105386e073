"""Batched MMDetection inference: one model call per batch of images."""
from __future__ import annotations

import logging
import time

import numpy as np

from .devices import replica_device
from .failures import TaskFailure
from .masks import MaskCrop
from .model_files import ModelFileError, safe_checkpoint_loading
from .regions import Detections

logger = logging.getLogger(__name__)


def warmup_images() -> list[np.ndarray]:
    """Inputs of three aspect ratios (keep-ratio resizes give each its own
    shape), fixed noise so every start measures the same work."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((480, 640), (640, 480), (720, 1280))]


def mask_crops(masks, n: int) -> list[MaskCrop]:
    """Each instance's mask cut to its own extent, bit-packed: what leaves the
    Detector is bounded by the instances' areas / 8, not N x H x W. Only the
    cut crops are copied off the device."""
    import torch

    masks = torch.as_tensor(masks)
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"expected {n} masks of H x W, got shape {tuple(masks.shape)}")
    masks = masks if masks.dtype == torch.bool else masks > 0.5
    rows, cols = masks.any(dim=2).cpu().numpy(), masks.any(dim=1).cpu().numpy()
    crops = []
    for k in range(n):
        ys, xs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        if ys.size == 0:
            crops.append(MaskCrop.empty())  # nothing left after the model's threshold
            continue
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        crops.append(MaskCrop.from_crop(x0, y0, masks[k, y0:y1, x0:x1].cpu().numpy()))
    return crops


class BatchDetector:
    """An MMDetection model plus its test pipeline.

    `mmdet.apis.inference_detector` runs a list one image at a time; here the
    pipeline runs per image, the results are collated, and the model is called
    once per batch (`model.test_step`). Boxes come back rescaled to each
    image's original size.
    """

    def __init__(self, config_file: str, checkpoint_file: str, device: str = "cpu", allow_cpu_fallback: bool = False,
                 acceleration: str = "eager"):
        import torch
        from mmcv.transforms import Compose
        from mmdet.apis import init_detector
        from mmdet.utils import get_test_pipeline_cfg

        self.device = replica_device(device, allow_cpu_fallback)
        self._torch = torch
        try:
            with safe_checkpoint_loading():
                self.model = init_detector(config_file, checkpoint_file, device=self.device)
        except Exception as exc:
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise ModelFileError(
                    f"checkpoint {checkpoint_file} holds objects outside the safe allowlist, so it was "
                    f"not unpickled ({str(exc).splitlines()[0]}); re-save it with only its state_dict "
                    "and meta, or use a checkpoint you trust from the model zoo"
                ) from None
            raise
        classes = (self.model.dataset_meta or {}).get("classes")
        if not classes:
            raise ModelFileError(
                f"checkpoint {checkpoint_file} carries no class names (meta.dataset_meta.classes); "
                "save it with its dataset_meta"
            )
        self.class_names = [str(c) for c in classes]
        pipeline_cfg = get_test_pipeline_cfg(self.model.cfg.copy())
        pipeline_cfg[0].type = "mmdet.LoadImageFromNDArray"
        self.pipeline = Compose(pipeline_cfg)
        self.acceleration_report = self._accelerate(acceleration)

    def _accelerate(self, mode: str) -> dict:
        """channels_last / torch.compile of backbone + neck (mmdet_ls.acceleration),
        compiled and measured here, before the caller reports ready."""
        if mode == "eager":
            return {"mode": "eager", "requested": "eager", "reason": "eager asked for"}
        from .acceleration import accelerate

        images = warmup_images()
        report = accelerate(self.model, mode, warmup=lambda: self.detect(images, stacked=False), images=len(images))
        return report.as_dict()

    def compile_count(self) -> int:
        from .acceleration import compile_count

        return compile_count(self.model)

    def _prepare(self, bgr: np.ndarray, index: int) -> dict:
        return self.pipeline(dict(img=bgr, img_id=index))

    def _run(self, prepared: list[dict]) -> list:
        batch = {
            "inputs": [p["inputs"] for p in prepared],
            "data_samples": [p["data_samples"] for p in prepared],
        }
        with self._torch.no_grad():
            return self.model.test_step(batch)

    def _to_detections(self, sample, width: int, height: int, seconds: float) -> Detections:
        inst = sample.pred_instances
        labels = inst.labels.cpu().numpy().astype(int)
        masks = mask_crops(inst.masks, len(labels)) if "masks" in inst else None
        return Detections(
            boxes=inst.bboxes.cpu().numpy().astype(np.float32).reshape(-1, 4),
            scores=inst.scores.cpu().numpy().astype(np.float32).reshape(-1),
            class_names=[self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in labels],
            width=width,
            height=height,
            timings={"model_s": seconds},
            masks=masks,
        )

    def detect(self, images: list[np.ndarray], stacked: bool = True) -> list[Detections | TaskFailure]:
        """Detections per image, or a TaskFailure for an image that failed.

        stacked=True runs one model call for the whole batch (GPU); False runs
        the images one by one (faster per image on a CPU).
        """
        results: list[Detections | TaskFailure | None] = [None] * len(images)
        prepared, slots = [], []
        for i, bgr in enumerate(images):
            try:
                prepared.append(self._prepare(bgr, i))
                slots.append(i)
            except Exception as exc:  # a degenerate image fails only itself
                results[i] = TaskFailure("preprocess_error", f"preprocessing failed: {type(exc).__name__}: {exc}")
        groups = [list(range(len(slots)))] if stacked and slots else [[k] for k in range(len(slots))]
        for group in groups:
            self._run_group(images, prepared, slots, group, results)
        return results  # type: ignore[return-value]

    def _run_group(self, images, prepared, slots, group, results) -> None:
        start = time.perf_counter()
        try:
            samples = self._run([prepared[k] for k in group])
        except Exception as exc:
            if len(group) > 1:  # find the image that breaks the batch; the rest still run
                logger.warning("batch of %d failed (%s); retrying one by one", len(group), exc)
                for k in group:
                    self._run_group(images, prepared, slots, [k], results)
                return
            results[slots[group[0]]] = TaskFailure(
                "model_error", f"model failed on this image: {type(exc).__name__}: {exc}")
            return
        per_image = (time.perf_counter() - start) / len(group)
        for k, sample in zip(group, samples, strict=True):
            h, w = images[slots[k]].shape[:2]
            results[slots[k]] = self._to_detections(sample, w, h, per_image)
