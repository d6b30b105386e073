"""Which device a Detector replica runs on.

The GPU a replica may use is the one Ray reserved for it (the Detector's
`ray_actor_options.num_gpus` in the serve config): `auto` follows that
reservation, and an explicit `cuda` without one is an error, never a silent
run on the CPU.
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|gpu)(?::(\d+))?$")


class DeviceError(ValueError):
    """The device setting cannot be honoured; the message says what to set."""


def parse_device(device: str) -> str:
    """Normalise `auto`, `cpu`, `cuda`, `cuda:N`, legacy `gpu:N` -> `auto`,
    `cpu` or a torch `cuda:N` string."""
    m = _DEVICE_RE.match((device or "auto").strip().lower())
    if not m or (m.group(1) in ("auto", "cpu") and m.group(2)):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, gpu:N")
    kind, index = m.group(1), m.group(2)
    if kind in ("auto", "cpu"):
        return kind
    return f"cuda:{index or 0}"


def resolve_device(device: str, reserved_gpus: int, cuda_devices: int, allow_cpu_fallback: bool = False) -> str:
    """The torch device for a replica that Ray gave `reserved_gpus` GPUs and
    on which torch sees `cuda_devices` CUDA devices."""
    wanted = parse_device(device)
    if wanted == "cpu":
        if reserved_gpus:
            logger.warning("device cpu, but Ray reserved a GPU for this replica: it stays idle")
        return "cpu"
    if wanted == "auto" and not reserved_gpus:
        return "cpu"
    if not reserved_gpus:
        raise DeviceError(
            f"device {device!r} needs a GPU, but this Detector replica has none reserved: set "
            "ray_actor_options: {num_gpus: 1} for the Detector in the serve config (serve_config.gpu.yaml does), "
            "or device: auto to run where the replica lands"
        )
    if not cuda_devices:
        if allow_cpu_fallback:
            logger.warning("Ray reserved a GPU but CUDA is not available here: running on the CPU "
                           "(allow_cpu_fallback)")
            return "cpu"
        raise DeviceError(
            "Ray reserved a GPU for this Detector replica, but torch sees no CUDA device on its node (a CPU-only "
            "torch, no driver, or a node that declares GPUs it lacks); fix the node, or set allow_cpu_fallback: true"
        )
    if wanted == "auto":
        return "cuda:0"
    index = int(wanted.split(":")[1])
    if index >= cuda_devices:
        # Under Ray, CUDA_VISIBLE_DEVICES shows a replica only its own GPUs.
        logger.warning("device %s not visible (%d visible GPU(s)); using cuda:0", wanted, cuda_devices)
        return "cuda:0"
    return wanted


def _ray_reserved_gpus() -> int | None:
    """GPUs Ray assigned to this process, or None outside a Ray worker."""
    try:
        import ray

        if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
            return None
        return len(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    except Exception:
        return None


def replica_device(device: str, allow_cpu_fallback: bool = False) -> str:
    """resolve_device for this process: inside a Ray worker the GPUs Ray
    assigned to it; outside Ray (bench, tests) every CUDA device it sees."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reserved = _ray_reserved_gpus()
    return resolve_device(device, cuda if reserved is None else reserved, cuda, allow_cpu_fallback)
