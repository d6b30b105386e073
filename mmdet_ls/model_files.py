"""Resolve config/checkpoint arguments, derive model_version, pick the device,
and load checkpoints safely under torch's weights_only unpickler."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

CHECKPOINT_CACHE_ENV = "MMDET_LS_CHECKPOINT_CACHE"


class ModelFileError(RuntimeError):
    """A model file cannot be found or used; the message says what to set."""


def mmdet_config_dir() -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def resolve_config_file(config_file: str) -> str:
    """A path, or a config name shipped in the mmdet package
    (`faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py`, also as `mmdet::...`)."""
    if not config_file:
        raise ModelFileError("config_file is empty: set it to a config path or an mmdet config name")
    path = Path(os.path.expanduser(config_file))
    if path.is_file():
        return str(path.resolve())
    name = config_file.removeprefix("mmdet::")
    shipped = mmdet_config_dir() / name
    if shipped.is_file():
        return str(shipped)
    raise ModelFileError(
        f"config_file {config_file!r} is neither a file nor a config shipped with mmdet "
        f"(looked in {mmdet_config_dir()}); e.g. 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'"
    )


def is_url(value: str) -> bool:
    return urlsplit(value).scheme in ("http", "https")


def checkpoint_cache_dir() -> Path:
    default = Path.home() / ".cache" / "mmdet-ls-backend" / "checkpoints"
    return Path(os.environ.get(CHECKPOINT_CACHE_ENV) or default)


def cached_checkpoint_path(url: str) -> Path:
    name = os.path.basename(urlsplit(url).path) or "checkpoint.pth"
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return checkpoint_cache_dir() / f"{key}-{name}"


def resolve_checkpoint_file(checkpoint_file: str, timeout_s: float = 60.0) -> str:
    """Local path of the checkpoint; URLs are downloaded once into the cache."""
    if not checkpoint_file:
        raise ModelFileError("checkpoint_file is empty: set it to a .pth path or an http(s) URL")
    if not is_url(checkpoint_file):
        path = Path(os.path.expanduser(checkpoint_file))
        if not path.is_file():
            raise ModelFileError(f"checkpoint_file {checkpoint_file!r} does not exist")
        return str(path.resolve())
    target = cached_checkpoint_path(checkpoint_file)
    if target.is_file():
        return str(target)
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading checkpoint %s into %s", checkpoint_file, target)
    try:
        with requests.get(checkpoint_file, stream=True, timeout=(10, timeout_s)) as resp:
            resp.raise_for_status()
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(resp.raw, tmp, 1 << 20)
        os.replace(tmp.name, target)  # atomic: concurrent replicas never see half a file
    except Exception as exc:
        raise ModelFileError(
            f"cannot download checkpoint_file {checkpoint_file} ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the file elsewhere, copy it here and set "
            "checkpoint_file to its local path (e.g. `serve run serve_config.yaml` after editing "
            f"applications[0].args.checkpoint_file), or place it at {target}"
        ) from None
    return str(target)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_version(config_file: str, checkpoint_file: str) -> str:
    """Stable id of the model: config name + checkpoint digest.

    Local checkpoints are digested by content; URLs by the URL itself (zoo
    URLs carry their own hash), so the version is known before download.
    """
    stem = Path(urlsplit(config_file).path).stem or "model"
    if is_url(checkpoint_file):
        digest = hashlib.sha256(checkpoint_file.encode()).hexdigest()
    elif Path(checkpoint_file).is_file():
        digest = file_digest(checkpoint_file)
    else:
        digest = hashlib.sha256(checkpoint_file.encode()).hexdigest()
    return f"{stem}-{digest[:12]}"


_DEVICE_RE = re.compile(r"^(cpu|cuda|gpu)(?::(\d+))?$")


def parse_device(device: str) -> str:
    """Normalise `cpu`, `cuda`, `cuda:N`, legacy `gpu:N` -> torch device string."""
    m = _DEVICE_RE.match((device or "cpu").strip().lower())
    if not m:
        raise ModelFileError(f"device {device!r} is not one of cpu, cuda, cuda:N, gpu:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return "cpu"
    return f"cuda:{index or 0}"


def select_device(device: str) -> str:
    """The device to run on; falls back to CPU with one warning when CUDA is absent."""
    wanted = parse_device(device)
    if wanted == "cpu":
        return wanted
    import torch

    if not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available here: running on CPU", device)
        return "cpu"
    index = int(wanted.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        # Under Ray, CUDA_VISIBLE_DEVICES shows a replica only its own GPUs.
        logger.warning("device %s not visible (%d visible GPU(s)); using cuda:0", wanted, count)
        return "cuda:0"
    return wanted


def _inert_getattr(obj, name, *default):
    """Stands in for `builtins.getattr` while unpickling checkpoints.

    mmengine's HistoryBuffer (in a training checkpoint's message_hub) pickles
    bound methods as getattr(...). Calling the real getattr from a pickle is
    a gadget, and serving never reads the message hub, so it gets None.
    """
    return None


def checkpoint_safe_globals() -> list:
    """Types that training-loop and zoo checkpoints hold besides tensors.

    torch >= 2.6 unpickles with weights_only=True; we allowlist these data-only
    types instead of turning that protection off.
    """
    import numpy as np

    allowed: list = [np.ndarray, np.dtype, (_inert_getattr, "builtins.getattr")]
    try:
        allowed.append(np._core.multiarray._reconstruct)
        allowed.append(np._core.multiarray.scalar)
    except AttributeError:
        allowed.append(np.core.multiarray._reconstruct)
        allowed.append(np.core.multiarray.scalar)
    allowed.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8"))
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        allowed.append(HistoryBuffer)
    except ImportError:
        pass
    try:
        from mmengine.config.config import ConfigDict

        allowed.append(ConfigDict)
    except ImportError:
        pass
    return allowed


@contextmanager
def safe_checkpoint_loading():
    import torch

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        yield
