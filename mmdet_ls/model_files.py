"""Resolve config/checkpoint arguments, derive model_version, pick the device,
and load checkpoints safely under torch's weights_only unpickler."""
from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import re
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import http_fetch
from .failures import TaskError
from .http_fetch import FetchLimits
from .network_policy import NetworkPolicy
from .urls import URL, parse_url

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


_URL_SCHEME_RE = re.compile(r"^\s*https?:", re.IGNORECASE)


def is_url(value: str) -> bool:
    """Whether checkpoint_file names an http(s) URL (read by `parse_url`) rather than a path."""
    return bool(_URL_SCHEME_RE.match(value or ""))


DEFAULT_DOWNLOAD_TIMEOUT_S = 600.0  # wall clock for the whole download, redirects included
DEFAULT_MAX_CHECKPOINT_BYTES = 4 << 30
# OpenMMLab zoo names end in "-<first 8 hex digits of the file's sha256>.pth".
_NAME_HASH_RE = re.compile(r"-([0-9a-fA-F]{8})\.\w+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle, protocol 2 or later
_MAX_CACHE_NAME = 120
_OFFLINE_HINT = (
    "If this machine is offline, download the file elsewhere, copy it here and set "
    "checkpoint_file to its local path (e.g. `serve run serve_config.yaml` after editing "
    "applications[0].args.checkpoint_file)"
)


def checkpoint_cache_dir() -> Path:
    default = Path.home() / ".cache" / "mmdet-ls-backend" / "checkpoints"
    return Path(os.environ.get(CHECKPOINT_CACHE_ENV) or default)


def cache_dir_display() -> str:
    """The cache folder as messages name it: relative to ~, never an absolute path."""
    folder = checkpoint_cache_dir()
    try:
        return "~/" + folder.resolve().relative_to(Path.home().resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):
        return f"the folder named by ${CHECKPOINT_CACHE_ENV}"


def _parse_checkpoint_url(checkpoint_file: str) -> URL:
    try:
        return parse_url(checkpoint_file)
    except TaskError as exc:
        raise ModelFileError(f"checkpoint_file is not a usable URL: {exc}") from None


def _url_file_name(url: URL) -> str:
    return unquote(url.path.rsplit("/", 1)[-1])


def cached_checkpoint_path(url: str) -> Path:
    """Where the checkpoint of `url` is cached (the same path in every replica and
    in the init container): a hash of the URL text + the file's own name."""
    parsed = _parse_checkpoint_url(url)
    name = re.sub(r"[^A-Za-z0-9._+=@-]", "_", _url_file_name(parsed)).lstrip(".")[-_MAX_CACHE_NAME:]
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return checkpoint_cache_dir() / f"{key}-{name or 'checkpoint.pth'}"


def expected_checkpoint_sha256(url: URL | None, checkpoint_sha256: str | None) -> tuple[str, str] | None:
    """(hex digest or prefix, where it comes from), or None when nothing is known.

    A configured full digest wins over the 8-digit prefix in a zoo file name."""
    if checkpoint_sha256:
        digest = checkpoint_sha256.strip().lower().removeprefix("sha256:")
        if not _SHA256_RE.match(digest):
            raise ModelFileError("checkpoint_sha256 must be the file's full sha256: 64 hex digits")
        return digest, "checkpoint_sha256"
    if url is not None:
        match = _NAME_HASH_RE.search(_url_file_name(url))
        if match:
            return match.group(1).lower(), "its file name (OpenMMLab names carry the first 8 digits of the sha256)"
    return None


def _checkpoint_format_problem(path: Path) -> str | None:
    """Why the file is not a checkpoint torch can load, or None: a complete zip
    archive (torch.save) or a pickle (legacy torch.save)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return None if zipfile.is_zipfile(path) else "an incomplete zip archive (no central directory)"
    if head[:1] == _PICKLE_MAGIC:
        return None
    return "neither a zip archive nor a pickle"


def _basic_auth(userinfo: str) -> str:
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return f"Basic {token}"


def _describe(exc: BaseException) -> str:
    """An error's text for a message; OSErrors lose their file names (absolute paths)."""
    if isinstance(exc, (TaskError, ModelFileError)):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def _content_kind(resp) -> str:
    ctype = resp.header("Content-Type").split(";", 1)[0].strip().lower()
    ctype = re.sub(r"[^a-z0-9.+/-]", "", ctype)[:80]
    return ctype or "a file without a Content-Type"


def _download(url: URL, tmp_file, digest, timeout_s: float, max_bytes: int) -> int:
    """Stream the body of `url` into `tmp_file` (digest updated); returns the byte count."""
    origin = url.origin
    auth = _basic_auth(url.userinfo) if url.userinfo else None

    def hop_headers(hop: URL, chain_trusted: bool) -> dict[str, str]:
        # Credentials only while every hop so far stayed on the URL's own origin.
        return {"Authorization": auth} if auth and chain_trusted and hop.origin == origin else {}

    deadline = time.monotonic() + timeout_s
    limits = FetchLimits(
        connect_timeout_s=min(30.0, timeout_s), read_timeout_s=min(60.0, timeout_s),
        total_timeout_s=timeout_s, max_bytes=max_bytes,
    )
    with http_fetch.get(
        url, policy=CHECKPOINT_NETWORK_POLICY, limits=limits, hop_headers=hop_headers,
        trusted=lambda hop: hop.origin == origin, deadline=deadline,
    ) as resp:
        if resp.status != 200:
            raise ModelFileError(f"the server answered HTTP {resp.status}")
        head = b""
        size = 0
        for chunk in resp.iter_chunks(max_bytes, chunk_size=1 << 20):
            if len(head) < len(_ZIP_MAGIC):  # refuse a web page at its first bytes, not after 4 GiB
                head += chunk[: len(_ZIP_MAGIC) - len(head)]
                if not (head.startswith(_PICKLE_MAGIC) or _ZIP_MAGIC.startswith(head)):
                    raise ModelFileError(
                        f"the server sent {_content_kind(resp)}, not a checkpoint (neither a zip archive nor a pickle)"
                    )
            tmp_file.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        if not (head.startswith(_PICKLE_MAGIC) or head == _ZIP_MAGIC):
            raise ModelFileError(f"the server sent {size} bytes of {_content_kind(resp)}, not a checkpoint")
        return size


# The operator chose the URL, so private networks are fine; metadata and
# link-local addresses (cloud credentials) are never fetched.
CHECKPOINT_NETWORK_POLICY = NetworkPolicy(allow_private_networks=True)


def resolve_checkpoint_file(
    checkpoint_file: str,
    timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
    *,
    checkpoint_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> str:
    """Local path of the checkpoint; URLs are downloaded once into the cache.

    `timeout_s` bounds the whole download (DNS, redirects, body). The sha256 is
    checked against `checkpoint_sha256` when given, else against the 8-digit
    prefix in an OpenMMLab file name; a cached file is checked again each time.
    Local paths are checked against `checkpoint_sha256` only.
    """
    if not checkpoint_file:
        raise ModelFileError("checkpoint_file is empty: set it to a .pth path or an http(s) URL")
    if not is_url(checkpoint_file):
        path = Path(os.path.expanduser(checkpoint_file))
        if not path.is_file():
            raise ModelFileError(f"checkpoint_file {checkpoint_file!r} does not exist")
        expected = expected_checkpoint_sha256(None, checkpoint_sha256)
        if expected:
            actual = file_digest(str(path))
            if not actual.startswith(expected[0]):
                raise ModelFileError(
                    f"checkpoint_file {checkpoint_file!r} has sha256 {actual}, not the {expected[0]} "
                    "set in checkpoint_sha256"
                )
        return str(path.resolve())
    url = _parse_checkpoint_url(checkpoint_file)
    shown = url.redacted()
    expected = expected_checkpoint_sha256(url, checkpoint_sha256)
    target = cached_checkpoint_path(checkpoint_file)
    if target.is_file():
        problem = _checkpoint_format_problem(target)
        actual = file_digest(str(target)) if expected and not problem else None
        if problem is None and (not expected or actual.startswith(expected[0])):
            return str(target)
        logger.warning(
            "cached checkpoint %s (from %s) is %s; downloading it again", target.name, shown,
            problem or f"sha256 {actual}, not {expected[0]} from {expected[1]}",
        )
        try:
            target.unlink()
        except FileNotFoundError:
            pass
    folder = cache_dir_display()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise ModelFileError(
            f"cannot write the checkpoint cache {folder} ({_describe(exc)}): set {CHECKPOINT_CACHE_ENV} "
            f"to a writable folder. {_OFFLINE_HINT}"
        ) from None
    logger.info("downloading checkpoint %s into %s", shown, folder)
    started = time.monotonic()
    renamed = False
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as tmp_file:
                size = _download(url, tmp_file, digest, timeout_s, max_bytes)
                tmp_file.flush()
                os.fsync(tmp_file.fileno())
        except (ModelFileError, TaskError, OSError, http.client.HTTPException, ValueError) as exc:
            raise ModelFileError(
                f"cannot download checkpoint_file {shown}: {_describe(exc)}. {_OFFLINE_HINT}, "
                f"or copy it into {folder} as {target.name}"
            ) from None
        actual = digest.hexdigest()
        if expected and not actual.startswith(expected[0]):
            raise ModelFileError(
                f"checkpoint downloaded from {shown} has sha256 {actual}, which does not match "
                f"{expected[0]} from {expected[1]}; the file was not kept. If you trust this file, "
                "set checkpoint_sha256 to its digest"
            )
        problem = _checkpoint_format_problem(Path(tmp_name))
        if problem:
            raise ModelFileError(f"checkpoint downloaded from {shown} is {problem}; the file was not kept")
        os.replace(tmp_name, target)  # atomic: concurrent replicas never see half a file
        renamed = True
    finally:
        if not renamed:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
    logger.info(
        "checkpoint %s downloaded (%d bytes, sha256 %s) in %.1f s", shown, size, actual,
        time.monotonic() - started,
    )
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


TORCH_UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def safe_checkpoint_loading():
    """torch.load inside this block unpickles only tensors and the allowlist.

    Refuses outright when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: it makes
    torch.load unpickle anything, whatever the allowlist says.
    """
    if TORCH_UNSAFE_LOAD_ENV in os.environ:
        # No lower-case "weights_only" here: BatchDetector rewords errors that say it.
        raise ModelFileError(
            f"the environment variable {TORCH_UNSAFE_LOAD_ENV} is set: it turns off torch's protection "
            "against checkpoints that run code when loaded, so no checkpoint is loaded; "
            f"unset {TORCH_UNSAFE_LOAD_ENV} (in the serve config's runtime_env, the container or the shell)"
        )
    import torch

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        yield
