"""Application builder: binds the Label Studio backend's deployment graph.

    serve run serve_config.yaml            # uses build_app with the YAML's args
    serve run serve_app:build_app config_file=... checkpoint_file=...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from deployments.detector import Detector
from deployments.image_loader import ImageLoader
from deployments.ingress import LabelStudioIngress
from deployments.postprocess import Postprocess
from mmdet_ls.credentials import basic_auth_setting, operator_access
from mmdet_ls.image_sources import default_image_dir
from mmdet_ls.model_files import model_version, parse_device

DEFAULT_CONFIG = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
DEFAULT_CHECKPOINT = (
    "https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/"
    "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"
)
# Per device, from measurement: a stacked batch on the CPU ran 10-30 % slower
# per image than single images, so the CPU "batch" is a small queue drained
# one image at a time; on a GPU one call for many images is the throughput.
BATCH_DEFAULTS = {"cpu": 4, "cuda": 16}
# On the CPU a batch's images run one by one, so waiting for company only
# adds latency; batches still form from requests queued while the model runs.
BATCH_WAIT_DEFAULTS = {"cpu": 0.0, "cuda": 0.01}


def _env(*names: str) -> Optional[str]:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


SECRET_ARGS = {
    "label_studio_api_key": "LABEL_STUDIO_API_KEY",
    "basic_auth_pass": "BASIC_AUTH_PASS",
}


class AppArgs(BaseModel):
    """Everything the original backend took, plus serving knobs.

    Secrets are not args (Ray shows args to anyone with `serve config`):
    the Label Studio key and the basic-auth password come from the
    environment, see mmdet_ls/credentials.py.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt arg fails instead of being ignored

    config_file: str = DEFAULT_CONFIG
    checkpoint_file: str = DEFAULT_CHECKPOINT
    # Full sha256 of the checkpoint; else the zoo name's 8-digit prefix is checked.
    checkpoint_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    device: str = "cpu"
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    image_dir: Optional[str] = None
    # Default from LABEL_STUDIO_URL / LABEL_STUDIO_HOSTNAME; its key only from the environment.
    label_studio_url: Optional[str] = None
    max_batch_size: Optional[int] = Field(None, ge=1, le=512)
    batch_wait_timeout_s: Optional[float] = Field(None, ge=0.0, le=10.0)  # default per device
    stack_batches: Optional[bool] = None  # default: True on GPU, False on CPU
    torch_threads: Optional[int] = Field(None, ge=1)
    predict_timeout_s: float = Field(90.0, gt=0, le=100.0)  # Label Studio gives up at 100 s
    max_tasks_per_request: int = Field(1000, ge=1)
    max_inflight_images: int = Field(64, ge=1)
    allow_private_networks: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)
    # Image fetching limits (per image).
    fetch_connect_timeout_s: float = Field(5.0, gt=0)
    fetch_read_timeout_s: float = Field(15.0, gt=0)
    fetch_total_timeout_s: float = Field(30.0, gt=0)
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    basic_auth_user: Optional[str] = None  # password: BASIC_AUTH_PASS in the environment
    health_requires_auth: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, values):
        if isinstance(values, dict):
            for arg, env in SECRET_ARGS.items():
                if arg in values:
                    raise ValueError(
                        f"{arg} is a secret and not an app arg (Ray shows app args to anyone with `serve config`): "
                        f"set {env} (or {env}_FILE) in the environment of the Ray cluster instead"
                    )
        return values

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        parse_device(value)
        return value

    def resolved_image_dir(self) -> str:
        return str(Path(self.image_dir or _env("IMAGE_DIR") or default_image_dir()).expanduser())


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):
        args = AppArgs(**args)
    device_kind = "cpu" if parse_device(args.device) == "cpu" else "cuda"
    max_batch_size = args.max_batch_size or BATCH_DEFAULTS[device_kind]
    batch_wait_timeout_s = (
        BATCH_WAIT_DEFAULTS[device_kind] if args.batch_wait_timeout_s is None else args.batch_wait_timeout_s
    )
    # Fail here, with the setting to fix, not later in a replica.
    operator_access(args.label_studio_url)
    basic_auth_setting(args.basic_auth_user)

    loader = ImageLoader.bind(
        image_dir=args.resolved_image_dir(),
        limits={
            "connect_timeout_s": args.fetch_connect_timeout_s,
            "read_timeout_s": args.fetch_read_timeout_s,
            "total_timeout_s": args.fetch_total_timeout_s,
            "max_bytes": args.max_image_bytes,
        },
        allow_private_networks=args.allow_private_networks,
        # The Label Studio host is always allowed, wherever it lives.
        allowed_hosts=list(args.allowed_hosts),
        max_image_pixels=args.max_image_pixels,
    )
    detector = Detector.options(
        max_ongoing_requests=max(16, 2 * max_batch_size),
        user_config={"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s},
    ).bind(
        config_file=args.config_file,
        checkpoint_file=args.checkpoint_file,
        device=args.device,
        torch_threads=args.torch_threads,
        stack_batches=args.stack_batches,
        checkpoint_sha256=args.checkpoint_sha256,
    )
    postprocess = Postprocess.options(user_config={"score_threshold": args.score_threshold}).bind()
    return LabelStudioIngress.bind(
        loader,
        detector,
        postprocess,
        model_version=model_version(args.config_file, args.checkpoint_file),
        model_class=f"MMDetection({Path(args.config_file).stem})",
        label_studio_url=args.label_studio_url,
        predict_timeout_s=args.predict_timeout_s,
        max_tasks_per_request=args.max_tasks_per_request,
        max_inflight_images=args.max_inflight_images,
        basic_auth_user=args.basic_auth_user,
        health_requires_auth=args.health_requires_auth,
    )
