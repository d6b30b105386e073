"""Application builder: binds the Label Studio backend's deployment graph.

    serve run serve_config.yaml            # uses build_app with the YAML's args
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from deployments.detector import Detector, usable_cores
from deployments.image_loader import ImageLoader
from deployments.ingress import MAX_INFLIGHT_IMAGES, MAX_TASKS_PER_REQUEST, PREDICT_TIMEOUT_S, LabelStudioIngress
from deployments.job_runner import JobRunner
from deployments.postprocess import Postprocess
from mmdet_ls.credentials import basic_auth_setting, operator_access
from mmdet_ls.devices import parse_device
from mmdet_ls.http_fetch import FetchLimits
from mmdet_ls.image_sources import default_image_dir
from mmdet_ls.images import DEFAULT_MAX_PIXELS
from mmdet_ls.label_config import ModelOutputs
from mmdet_ls.model_files import default_checkpoint_for, model_version
from mmdet_ls.model_outputs import config_predicts_masks
from mmdet_ls.settings import ENV_FALLBACKS, env_value, misplaced_arg_message

DEFAULT_CONFIG = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


class AppArgs(BaseModel):
    """The application parameters: the original backend's and the serving knobs.

    Each has one owner (mmdet_ls/settings.py, docs/configuration.md): here,
    with the environment fallbacks of settings.ENV_FALLBACKS (explicit arg >
    environment > default). Live settings (score_threshold, batch settings)
    belong to a deployment's user_config and secrets to the environment:
    given as args, they are refused with a message saying where they go.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt arg fails instead of being ignored

    # A path, an mmdet config (3.x or the seed's 2.x name) or a model name.
    config_file: str = DEFAULT_CONFIG
    checkpoint_file: Optional[str] = None  # default: the config's zoo weights
    # Full sha256 of the checkpoint; else the zoo name's 8-digit prefix is checked.
    checkpoint_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    device: str = "auto"  # auto: the GPU Ray reserved for the Detector, else the CPU
    allow_cpu_fallback: bool = False  # run on the CPU when a reserved GPU has no CUDA (tests' fake GPUs)
    image_dir: Optional[str] = None
    # Default from LABEL_STUDIO_URL / LABEL_STUDIO_HOSTNAME; its key only from the environment.
    label_studio_url: Optional[str] = None
    stack_batches: Optional[bool] = None  # default: True on GPU, False on CPU
    torch_threads: Optional[int] = Field(None, ge=1)
    # auto: on the CPU, channels_last or torch.compile when it measured faster at start-up
    model_acceleration: Literal["auto", "eager", "channels_last", "compile"] = "auto"
    predict_timeout_s: float = Field(PREDICT_TIMEOUT_S, gt=0, le=100.0)  # Label Studio gives up at 100 s
    max_tasks_per_request: int = Field(MAX_TASKS_PER_REQUEST, ge=1)
    max_inflight_images: Optional[int] = Field(None, ge=1)  # default: 32 on the CPU, 64 with a GPU
    allow_private_networks: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)
    # Image fetching limits (per image).
    fetch_connect_timeout_s: float = Field(FetchLimits.connect_timeout_s, gt=0)
    fetch_read_timeout_s: float = Field(FetchLimits.read_timeout_s, gt=0)
    fetch_total_timeout_s: float = Field(FetchLimits.total_timeout_s, gt=0)
    max_image_bytes: int = Field(FetchLimits.max_bytes, ge=1)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    basic_auth_user: Optional[str] = None  # password: BASIC_AUTH_PASS in the environment
    health_requires_auth: bool = False
    log_level: Optional[str] = None  # DEBUG, INFO, WARNING, ERROR for every deployment
    # Jobs (docs/jobs.md): a TASKS_CREATED webhook starts a job for the new
    # tasks, and a sweep every annotate_sweep_interval_s catches missed ones.
    annotate_new_tasks: bool = False
    annotate_sweep_interval_s: float = Field(600.0, ge=10.0)
    # Images a job keeps in flight; default: the Detectors' max_batch_size x replicas x 2.
    bulk_inflight_images: Optional[int] = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _owners(cls, values):
        values = dict(values or {})
        for name in values:
            message = misplaced_arg_message(name)
            if message:
                raise ValueError(message)
        for name, env_names in ENV_FALLBACKS.items():
            if values.get(name) is None:
                value = env_value(*env_names)
                if value is not None:
                    values[name] = value
        return values

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        parse_device(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _valid_log_level(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return value.upper() if value else value

    def resolved_image_dir(self) -> str:
        return str(Path(self.image_dir or default_image_dir()).expanduser())


# Model processes a CPU-only machine runs by default. One image does not
# keep two cores busy (its Python and single-threaded steps leave one idle),
# so two replicas of half the cores each overlap two images: 1.2-2x the
# images/s of one replica on every core on 2 cores, at some single-image
# latency (bench/results/serving-20261202-053637-cpu.json, docs/performance.md
# "Who gets the CPU"). Two, not one per core: each is a copy of the model.
CPU_DETECTOR_REPLICAS = 2


def this_node_cpus() -> float:
    """CPUs of the Ray node building the app (the machine, for `serve run`),
    at most the cores this process may run on: a node can declare more CPUs
    than its machine has, but never run more threads at once."""
    try:
        import ray

        if not ray.is_initialized():  # built outside Ray (a test, a script): this machine
            return float(usable_cores())
        node_id = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node_id), 0)
    except Exception:
        cpus = 0
    return float(min(cpus, usable_cores()) if cpus else usable_cores())


def cluster_has_gpus() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        return False


def detector_on_cpu(device: str) -> bool:
    """Whether the Detector will run on the CPU: asked for, or auto with no GPU in the cluster."""
    wanted = parse_device(device)
    return wanted == "cpu" or (wanted == "auto" and not cluster_has_gpus())


def detector_defaults(on_cpu: bool) -> dict:
    """The Detector's replicas and resources where the serve config sets none:
    on a CPU machine, CPU_DETECTOR_REPLICAS replicas sharing its cores (torch
    threads follow each one's reservation); with a GPU in sight, one replica.
    The serve config's num_replicas / autoscaling_config / ray_actor_options
    win over these."""
    cpus = this_node_cpus()
    replicas = CPU_DETECTOR_REPLICAS if on_cpu and cpus >= CPU_DETECTOR_REPLICAS else 1
    return {"num_replicas": replicas,
            "ray_actor_options": {"num_cpus": float(int(cpus) // replicas) if replicas > 1 else cpus, "num_gpus": 0}}


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):
        args = AppArgs(**args)
    # Fail here, with the setting to fix, not later in a replica.
    operator_access(args.label_studio_url)
    basic_auth_setting(args.basic_auth_user)
    checkpoint_file = args.checkpoint_file or default_checkpoint_for(args.config_file)
    if not checkpoint_file:
        raise ValueError(f"config_file {args.config_file!r} has no zoo weights: set checkpoint_file")
    # Deployment options belong to the serve config; only logging is set here,
    # because LOG_LEVEL / log_level is its documented owner.
    logged = {"logging_config": {"log_level": args.log_level}} if args.log_level else {}
    # Unless the serve config sets them, the Detector's replicas share every
    # CPU of this machine (torch threads follow each reservation): the other
    # deployments reserve none (docs/performance.md: the measured rule).
    on_cpu = detector_on_cpu(args.device)
    detector_resources = detector_defaults(on_cpu)

    loader = ImageLoader.options(**logged).bind(
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
    detector = Detector.options(**logged, **detector_resources).bind(
        config_file=args.config_file,
        checkpoint_file=checkpoint_file,
        device=args.device,
        allow_cpu_fallback=args.allow_cpu_fallback,
        torch_threads=args.torch_threads,
        stack_batches=args.stack_batches,
        checkpoint_sha256=args.checkpoint_sha256,
        acceleration=args.model_acceleration,
    )
    postprocess = Postprocess.options(**logged).bind()
    version = model_version(args.config_file, checkpoint_file)
    # From the config alone (no model is loaded here): /setup checks the label config against it.
    outputs = ModelOutputs(name=Path(args.config_file).stem, masks=config_predicts_masks(args.config_file))
    jobs = JobRunner.options(**logged).bind(
        loader,
        detector,
        postprocess,
        model_version=version,
        label_studio_url=args.label_studio_url,
        annotate_new_tasks=args.annotate_new_tasks,
        annotate_sweep_interval_s=args.annotate_sweep_interval_s,
        bulk_inflight_images=args.bulk_inflight_images,
        model_outputs=outputs,
    )
    return LabelStudioIngress.options(**logged).bind(
        loader,
        detector,
        postprocess,
        jobs,
        model_version=version,
        model_class=f"MMDetection({Path(args.config_file).stem})",
        label_studio_url=args.label_studio_url,
        predict_timeout_s=args.predict_timeout_s,
        max_tasks_per_request=args.max_tasks_per_request,
        max_inflight_images=args.max_inflight_images or MAX_INFLIGHT_IMAGES["cpu" if on_cpu else "gpu"],
        basic_auth_user=args.basic_auth_user,
        health_requires_auth=args.health_requires_auth,
        model_outputs=outputs,
    )
