"""Resolve config/checkpoint arguments, derive model_version, pick the device,
and load checkpoints safely under torch's weights_only unpickler."""
from __future__ import annotations

import base64
import difflib
import hashlib
import http.client
import importlib.util
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from . import http_fetch
from .failures import TaskError
from .http_fetch import FetchLimits
from .network_policy import NetworkPolicy
from .urls import URL, parse_url

logger = logging.getLogger(__name__)

CHECKPOINT_CACHE_ENV = "MODEL_DIR"  # as in Label Studio's ML backends; MMDET_LS_CHECKPOINT_CACHE is its old name


class ModelFileError(RuntimeError):
    """A model file cannot be found or used; the message says what to set."""


def mmdet_config_dir() -> Path:
    """The `configs` folder of the installed mmdet: `mmdet/.mim/configs` in a
    wheel, the repository's `configs` in a source checkout (mmengine's rule)."""
    return _mmdet_mim_dir() / "configs"


def _mmdet_mim_dir() -> Path:
    """Where mmdet's `configs` and `model-index.yml` are, by the rule of mmengine's
    `BaseInferencer._get_repo_or_mim_dir`, found without importing mmdet (and torch):
    `model_version` runs in the process that builds the app."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("mmdet is not installed here: it is needed to find its configs")
    package = Path(next(iter(spec.submodule_search_locations)))
    return package.parent if (package.parent / "configs").is_dir() else package / ".mim"


# Renames from MMDetection 2.x to 3.x config names, on top of '_' vs '-':
# "mstrain" became "ms", and "8x2" (GPUs x images per GPU) became "8xb2".
_GPU_BATCH_TOKEN_RE = re.compile(r"^(\d+)x(\d+)$")
_RENAMED_TOKENS = {"mstrain": "ms"}


def _name_key(name: str) -> str:
    """A config or model name with MMDetection 2.x -> 3.x spelling differences removed."""
    tokens = name.strip().lower().replace("-", "_").split("_")
    tokens = [_GPU_BATCH_TOKEN_RE.sub(r"\1xb\2", _RENAMED_TOKENS.get(t, t)) for t in tokens]
    return "_".join(tokens)


def _config_stem(name: str) -> str:
    """`faster-rcnn_r50_fpn_1x_coco.py` -> `faster-rcnn_r50_fpn_1x_coco`; names may hold dots
    (`mask-rcnn_regnetx-3.2GF_fpn_ms-3x_coco`), so only a `.py` suffix is cut."""
    return name.removesuffix(".py")


@dataclass(frozen=True)
class ShippedConfigs:
    """mmdet's shipped configs and its metafiles' models, looked up by name.

    `tables` are tried in order; each maps a key (made from the asked name by
    its `key` function) to the configs (paths relative to `root`) it names.
    """

    root: Path
    configs: frozenset[str]
    dirs: frozenset[str]
    tables: tuple[tuple[str, Callable[[str], str], dict[str, tuple[str, ...]]], ...]
    weights: dict[str, str]  # config -> zoo checkpoint URL of its (first) metafile model
    suggestions: dict[str, str]  # _name_key(config stem, model name or alias) -> config


def _metafile_models(mim_dir: Path) -> list[dict]:
    """Every model of every metafile that model-index.yml imports: the walk of
    mmengine's `BaseInferencer._get_models_from_metafile` (what DetInferencer uses
    to find `rtmdet-t`), with mmengine's file loader but without importing torch."""
    from mmengine.fileio import load

    models: list[dict] = []
    for meta in load(str(mim_dir / "model-index.yml")).get("Import") or []:
        models.extend(m for m in (load(str(mim_dir / meta)) or {}).get("Models") or [] if isinstance(m, dict))
    return models


def _add(table: dict[str, list[str]], key: str, config: str) -> None:
    if key and config not in table.setdefault(key, []):
        table[key].append(config)


@lru_cache(maxsize=1)
def shipped_configs() -> ShippedConfigs:
    """The index of mmdet's configs and metafiles, built once per process."""
    mim_dir = _mmdet_mim_dir()
    root = mim_dir / "configs"
    configs = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if "_base_" not in p.relative_to(root).parts
    )
    by_stem: dict[str, list[str]] = {}
    by_stem_key: dict[str, list[str]] = {}
    for config in configs:
        stem = _config_stem(PurePosixPath(config).name)
        _add(by_stem, stem, config)
        _add(by_stem_key, _name_key(stem), config)

    def shipped(model: dict) -> str | None:
        """The model's config; some metafiles name it wrongly (`gn%2Bws`, an old folder)."""
        written = unquote(str(model.get("Config") or "")).removeprefix("configs/")
        if written in by_stem.get(_config_stem(PurePosixPath(written).name), ()):
            return written
        for table, key in ((by_stem, _config_stem(PurePosixPath(written).name)),
                           (by_stem_key, _name_key(str(model.get("Name", ""))))):
            found = table.get(key, ())
            if len(found) == 1:
                return found[0]
        return None

    by_name: dict[str, list[str]] = {}
    by_name_key: dict[str, list[str]] = {}
    by_checkpoint_key: dict[str, list[str]] = {}
    weights: dict[str, str] = {}
    suggestions = {_name_key(_config_stem(PurePosixPath(c).name)): c for c in configs}
    seen: set[str] = set()
    for model in _metafile_models(mim_dir):
        config = shipped(model)
        if config is None:
            continue
        aliases = model.get("Alias") or []
        names = [str(model.get("Name", ""))] + ([aliases] if isinstance(aliases, str) else [str(a) for a in aliases])
        for name in filter(None, names):
            _add(by_name, name.lower(), config)
            _add(by_name_key, _name_key(name), config)
            suggestions.setdefault(_name_key(name), config)
        url = model.get("Weights")
        if isinstance(url, str) and url:
            # Zoo checkpoints sit in a folder named after their 2.x config:
            # .../faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth
            folder = unquote(urlsplit(url).path).split("/")[-2:-1]
            if folder:
                _add(by_checkpoint_key, _name_key(folder[0]), config)
        if config not in seen:  # as mmengine.hub.get_config: a config's first model gives its weights
            seen.add(config)
            if isinstance(url, str) and url:
                weights[config] = url
    dirs = {str(PurePosixPath(c).parent) for c in configs}
    dirs |= {d.split("/", 1)[0] for d in dirs}

    def frozen(table: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
        return {key: tuple(found) for key, found in table.items()}

    tables = (
        ("the config of that name", lambda s: s, frozen(by_stem)),
        ("the config of that model in mmdet's metafiles", str.lower, frozen(by_name)),
        ("mmdet 3's name for that config", _name_key, frozen(by_stem_key)),
        ("the config of that model in mmdet's metafiles", _name_key, frozen(by_name_key)),
        ("the config whose zoo checkpoint carries that name", _name_key, frozen(by_checkpoint_key)),
    )
    return ShippedConfigs(root, frozenset(configs), frozenset(dirs), tables, weights, suggestions)


def _shipped_relative(config_file: str) -> PurePosixPath:
    """The part of a config name under mmdet's `configs`: drops `mmdet::` and
    everything up to a `configs/` folder (`mmdetection/configs/faster_rcnn/x.py`)."""
    parts = PurePosixPath(config_file.strip().removeprefix("mmdet::")).parts
    if "configs" in parts:
        parts = parts[len(parts) - parts[::-1].index("configs"):]
    return PurePosixPath(*parts) if parts else PurePosixPath()


def _closest_names(index: ShippedConfigs, stem: str) -> list[str]:
    keys = difflib.get_close_matches(_name_key(stem), list(index.suggestions), n=10, cutoff=0.6)
    return list(dict.fromkeys(index.suggestions[k] for k in keys))[:5]


def _find_config(config_file: str) -> tuple[Path, str | None]:
    """(config path, how a name that is not a path was matched, or None)."""
    if not config_file or not config_file.strip():
        raise ModelFileError("config_file is empty: set it to a config path or an mmdet config name")
    path = Path(os.path.expanduser(config_file))
    if path.is_file():
        return path.resolve(), None
    root = mmdet_config_dir()
    rel = _shipped_relative(config_file)
    plain = not rel.is_absolute() and ".." not in rel.parts and rel.name
    if plain and (root / rel).is_file():
        exact = rel.as_posix() == config_file.strip().removeprefix("mmdet::")
        return root / rel, None if exact else "the same path under mmdet's configs"
    index = shipped_configs()
    family = str(rel.parent) if plain else ""
    if plain and (family == "." or family in index.dirs):
        stem = _config_stem(rel.name)
        for how, key, table in index.tables:
            found = table.get(key(stem), ())
            if len(found) > 1 and family != ".":  # e.g. grounding_dino/ vs mm_grounding_dino/
                found = (
                    tuple(f for f in found if str(PurePosixPath(f).parent) == family)
                    or tuple(f for f in found if f.split("/", 1)[0] == family.split("/", 1)[0])
                    or found
                )
            if len(found) == 1:
                return root / found[0], how
            if found:
                raise ModelFileError(
                    f"config_file {config_file!r} names more than one config shipped with mmdet: "
                    f"{', '.join(found[:5])}; set config_file to one of them"
                )
    close = _closest_names(index, _config_stem(rel.name or config_file))
    hint = (
        f"closest names: {', '.join(close)}" if close
        else "e.g. 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py' or 'rtmdet_tiny_8xb32-300e_coco'"
    )
    raise ModelFileError(
        f"config_file {config_file!r} is neither a file nor a config shipped with mmdet "
        f"(nor a 2.x name or a model name of its metafiles); {hint}"
    )


def resolve_config_file(config_file: str) -> str:
    """The config file to load. In this order: an existing file; a config shipped
    with mmdet (`faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py`, also `mmdet::...`,
    `configs/...`, `mmdetection/configs/...`); an MMDetection 2.x name of one
    (`faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py`); a model name (or alias) from
    mmdet's metafiles (`rtmdet_tiny_8xb32-300e_coco`, `rtmdet-t`). Logs what a
    name that is not a path resolved to; fails with the closest names."""
    path, how = _find_config(config_file)
    if how:
        logger.info("config_file %r resolved to mmdet's %s (%s)", config_file, _shipped_name(path), how)
    return str(path)


def _shipped_name(path: Path) -> str | None:
    """`faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py` for a config shipped with mmdet, else None."""
    try:
        return path.resolve().relative_to(mmdet_config_dir().resolve()).as_posix()
    except ValueError:
        return None


def default_checkpoint_for(config_file: str) -> str | None:
    """The zoo checkpoint URL of a config shipped with mmdet (however it is named,
    see resolve_config_file): the `Weights` of the metafile model whose `Config`
    it is, the same URL `mmengine.hub.get_config(..., pretrained=True)` gives.
    None for configs of one's own and configs without zoo weights; ModelFileError
    when config_file names no config."""
    path, _ = _find_config(config_file)
    name = _shipped_name(path)
    return shipped_configs().weights.get(name) if name else None


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
    from .settings import env_value

    try:
        folder = env_value(CHECKPOINT_CACHE_ENV, "MMDET_LS_CHECKPOINT_CACHE")
    except ValueError as exc:
        raise ModelFileError(str(exc)) from None
    return Path(folder or default)


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

    The same for every name of one config (a 2.x name, a shipped path, a
    metafile model name: the stem of the config they resolve to); a config
    file of one's own keeps its own stem. Local checkpoints are digested by
    content; URLs by the URL itself without user:password (zoo URLs carry
    their own hash), so the version is known before download.
    """
    stem = Path(urlsplit(config_file).path).stem or "model"
    if not Path(os.path.expanduser(config_file)).is_file():
        try:
            stem = Path(_find_config(config_file)[0]).stem
        except (ModelFileError, ImportError, OSError):
            pass  # the replica reports it; the version keeps the name as given
    if is_url(checkpoint_file):
        try:
            text = parse_url(checkpoint_file).without_userinfo()
        except TaskError:
            text = checkpoint_file
        digest = hashlib.sha256(text.encode()).hexdigest()
    elif Path(checkpoint_file).is_file():
        digest = file_digest(checkpoint_file)
    else:
        digest = hashlib.sha256(checkpoint_file.encode()).hexdigest()
    return f"{stem}-{digest[:12]}"


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
