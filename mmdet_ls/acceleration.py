"""Faster inference past the eager floor: channels_last and torch.compile of backbone + neck.

Modes (`MODES`):

- ``eager``: the model as MMDetection built it.
- ``channels_last``: backbone and neck run in NHWC memory format (the input is
  converted on the way in, the feature maps back to NCHW on the way out: mmcv's
  CPU RoIAlign reads its input as NCHW whatever its strides, so NHWC feature
  maps handed to a two-stage head give wrong boxes without an error).
- ``compile``: backbone + neck compiled by torch.compile (inductor), NCHW in
  and out. On the CPU with inductor, with inductor's freezing: the weights
  become constants, BN folds into the convolutions and their weights are
  prepacked for oneDNN. Without it, a replica on one thread (the shipped CPU
  layout) spent much of a Faster R-CNN image in PyTorch's slow im2col
  convolution (`aten::_slow_conv2d_forward`, where one thread and a batch under
  16 send 1x1 convolutions); bench/accel_bench.py's ``compile-unfrozen`` mode
  measures the difference. Freezing costs a longer compilation (AOTAutograd's
  cache bypasses frozen graphs) and is not used on other devices (not measured
  there). Only backbone + neck: the heads have data-dependent control flow (NMS, top-k,
  RoI sampling) that would break the graph or recompile. When the warm-up's
  inputs come in more than one size (Faster R-CNN keeps aspect ratios), image
  height and width are dynamic (`torch._dynamo.mark_dynamic`): one compilation
  serves every size, and dynamic kernels measured as fast as static ones here.
  A model whose inputs have one size (RTMDet pads to 640x640) gets one static
  graph, compiled ~3x faster; should another size come after all, torch
  recompiles once, with dynamic sizes. Padding to a few bucket shapes instead
  cost compute (up to 1.7x the pixels) and one compilation per bucket, and moved
  the results off eager near the padded edges: bench/accel_bench.py measures it.
- ``auto``: on the CPU, measure eager and each candidate on the caller's
  warm-up call and keep the fastest one that is at least `margin` faster than
  eager; otherwise (or when a candidate fails to compile or run) eager, with the
  reason. On other devices ``auto`` is eager: nothing here was measured there;
  the explicit modes still work on CUDA.

Everything (compilation included) happens inside `accelerate`, so a replica
that calls it before reporting ready is ready with the compiled model. The
compiled graph is cached on disk (inductor's FX graph and AOTAutograd caches,
under `default_cache_dir()` unless `cache_dir`, MMDET_LS_COMPILE_CACHE or
TORCHINDUCTOR_CACHE_DIR says otherwise), so a second start with the same model and torch skips
inductor's code generation and C++ builds and pays only for tracing.

Threads: compile in one thread, serve from another (the Detector's model
thread): the compiled code is shared, guards are per call; the calls are
expected one batch at a time, as the Detector makes them.

Usage (a model built by `mmdet.apis.init_detector`, called through `test_step`)::

    report = accelerate(model, "auto", warmup=lambda: run(images), images=len(images))
    logger.info(report.summary())
    compile_count(model)  # graphs compiled so far; constant once serving

Pure logic: no Ray.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("auto", "eager", "channels_last", "compile")
CANDIDATES = ("channels_last", "compile")  # what `auto` tries, in this order
BACKEND_ENV = "MMDET_LS_COMPILE_BACKEND"  # a torch.compile backend name; "inductor" unless set
CACHE_ENV = "MMDET_LS_COMPILE_CACHE"  # where compiled graphs persist (see use_compile_cache)
DEFAULT_MARGIN = 0.05  # a candidate must be this much faster than eager for `auto` to keep it

_ATTR = "_mmdet_ls_acceleration"


class AccelerationError(ValueError):
    """A mode that does not exist, or a model this module cannot accelerate."""


@dataclass
class AccelerationReport:
    requested: str  # the mode asked for
    mode: str  # the mode the model runs in now
    reason: str  # why this mode (and why not the others, when `auto` or a failure decided)
    device: str
    eager_s_per_image: float | None = None  # warm-up seconds per image, eager (measured by `auto`)
    chosen_s_per_image: float | None = None  # the same for the mode chosen
    compile_s: float | None = None  # first compiled call (tracing + compilation + one run), when compiled
    compiles: int = 0  # graphs compiled for this model in this process, tried modes included (compile_count)
    cache_dir: str | None = None  # inductor's on-disk cache, when compile was tried
    cache: dict = field(default_factory=dict)  # FX graph and AOTAutograd cache hits/misses during this call
    candidates: dict = field(default_factory=dict)  # mode -> {s_per_image, compile_s, error, ...}
    fell_back: bool = False  # a requested non-eager mode failed and the model runs eager
    dynamic: bool = False  # compiled with dynamic height and width
    frozen: bool = False  # compiled with inductor's freezing (weights as constants, BN folded, prepacked)
    input_shapes: list = field(default_factory=list)  # (H, W) of the backbone inputs the warm-up produced

    @property
    def speedup(self) -> float | None:
        if self.eager_s_per_image and self.chosen_s_per_image:
            return self.eager_s_per_image / self.chosen_s_per_image
        return None

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}

    def summary(self) -> str:
        """One log line."""
        parts = [f"acceleration {self.mode} (asked {self.requested}, {self.device})"]
        if self.eager_s_per_image is not None:
            parts.append(f"eager {self.eager_s_per_image:.3f} s/img")
        if self.chosen_s_per_image is not None and self.mode != "eager":
            parts.append(f"{self.mode} {self.chosen_s_per_image:.3f} s/img")
        if self.speedup is not None and self.mode != "eager":
            parts.append(f"{self.speedup:.2f}x")
        if self.compile_s is not None and self.mode == "compile":
            frozen = ", frozen" if self.frozen else ""
            parts.append(f"compiled in {self.compile_s:.1f} s ({self.compiles} graphs{frozen})")
        return ", ".join(parts) + f": {self.reason}"


def default_cache_dir() -> Path:
    """Where compiled graphs persist between starts: $XDG_CACHE_HOME or ~/.cache, then mmdet-ls-backend/inductor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmdet-ls-backend" / "inductor"


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> str:
    """Point inductor's on-disk caches at a directory and return it: `cache_dir`, else $MMDET_LS_COMPILE_CACHE,
    else a TORCHINDUCTOR_CACHE_DIR the user set, else default_cache_dir() (not inductor's default under /tmp,
    which a reboot or a tmp cleaner empties). Applies to compilations that start afterwards."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or _user_inductor_cache() or default_cache_dir()
    path = os.path.abspath(os.fspath(cache_dir))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:  # a read-only home: inductor's own default still works, only not across reboots
        logger.warning("compile cache %s not usable (%s); inductor's default cache is used", path, exc)
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or ""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def _user_inductor_cache() -> str | None:
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:  # inductor writes its own default into the variable once it has used it: that is not the user's choice
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

        if os.path.abspath(value) == os.path.abspath(inductor_default()):
            return None
    except Exception:
        pass
    return value


def current_mode(model) -> str:
    state = getattr(model, _ATTR, None)
    return state.mode if state is not None else "eager"


def compile_count(model) -> int:
    """Graphs torch.compile has compiled for this model's backbone + neck, recompilations included
    (0 when it was never compiled). Constant while serving means no image size recompiles."""
    state = getattr(model, _ATTR, None)
    return state.compiles if state is not None else 0


def set_mode(model, mode: str, *, backend: str | None = None, dynamic: bool | None = None,
             freezing: bool | None = None) -> None:
    """Switch the model to eager, channels_last or compile (no measuring, no fallback).

    compile does not compile here: the first call after it does (torch.compile is lazy). A compiled
    function `accelerate` or an earlier set_mode left on the model is reused when the backend and
    `dynamic` match (dynamic None: whatever it was compiled with; True for a first compilation).
    freezing None: `default_freezing` (inductor on the CPU)."""
    if mode not in MODES or mode == "auto":
        raise AccelerationError(f"acceleration mode must be one of {', '.join(m for m in MODES if m != 'auto')}, "
                                f"got {mode!r}")
    state = getattr(model, _ATTR, None)
    if state is None:
        state = _State(model)
        setattr(model, _ATTR, state)
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    if freezing is None:
        freezing = default_freezing(backend, _device_of(model))
    freezing = bool(freezing) and backend == "inductor"  # a config of inductor's only
    state.set(mode, backend=backend, dynamic=dynamic, freezing=freezing)


def default_freezing(backend: str, device: str) -> bool:
    """Whether `compile` freezes the weights: with inductor on the CPU (see the module docstring)."""
    return backend == "inductor" and device == "cpu"


def accelerate(
    model,
    mode: str = "auto",
    *,
    warmup: Callable[[], Any],
    images: int = 1,
    repeats: int = 2,  # timed warm-up calls per mode; 0: no timing (explicit modes only; auto needs 1+)
    margin: float = DEFAULT_MARGIN,
    backend: str | None = None,
    dynamic: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    candidates: tuple[str, ...] = CANDIDATES,
) -> AccelerationReport:
    """Put the model in `mode` (see the module docstring) and return what was chosen and measured.

    warmup: runs the model end to end the way it will serve (e.g. BatchDetector.detect on a few
    images of different sizes); it is called once per mode to warm up or compile, then `repeats`
    times timed. `images` is how many images one call runs, for seconds per image. Exceptions
    from the model during a compiled or channels_last run are caught even when `warmup` swallows
    them (BatchDetector.detect turns them into TaskFailures): such a mode falls back to eager.

    dynamic: compile with dynamic height and width. None: when the warm-up's inputs came in more
    than one size (dynamic compiled ~3x slower here and ran no faster; a fixed-size model, e.g.
    RTMDet padding to 640x640, is compiled for its one size, and should a new size come later,
    torch recompiles once with dynamic sizes).
    """
    if mode not in MODES:
        raise AccelerationError(f"acceleration mode must be one of {', '.join(MODES)}, got {mode!r}")
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    device = _device_of(model)
    images = max(1, int(images))
    report = AccelerationReport(requested=mode, mode="eager", reason="", device=device)
    tries = {"auto": tuple(candidates), "eager": ()}.get(mode, (mode,))
    if mode == "auto":
        repeats = max(1, repeats)
    if not hasattr(model, "backbone"):
        if mode != "auto" and tries:
            raise AccelerationError(f"{type(model).__name__} has no backbone to accelerate")
        tries, report.reason = (), f"{type(model).__name__} has no backbone to accelerate"
    if mode == "auto" and device != "cpu":
        tries = ()
        report.reason = f"auto measures on the CPU only; on {device} set channels_last or compile explicitly"
    if "compile" in tries:
        report.cache_dir = use_compile_cache(cache_dir)
    cache_before = _fx_cache_counters()

    set_mode(model, "eager")
    if tries and (mode == "auto" or ("compile" in tries and dynamic is None)):
        recorder = model.extract_feat = _ShapeRecorder(model.extract_feat)
        try:
            if mode == "auto":
                report.eager_s_per_image = _measure(warmup, repeats, images)
                report.candidates["eager"] = {"s_per_image": report.eager_s_per_image}
            else:
                warmup()
        finally:
            model.__dict__.pop("extract_feat", None)
        report.input_shapes = sorted(recorder.shapes)
    report.dynamic = len(report.input_shapes) > 1 if dynamic is None else bool(dynamic)
    results: dict[str, dict] = {}
    for candidate in tries:
        results[candidate] = _try(model, candidate, warmup, repeats, images, backend, report.dynamic)
        set_mode(model, "eager", dynamic=report.dynamic)
    report.candidates.update(results)

    chosen, why = "eager", report.reason or "eager asked for"
    if mode == "auto" and tries:
        good = {m: r["s_per_image"] for m, r in results.items() if r.get("error") is None}
        fastest = min(good, key=good.get) if good else None
        limit = report.eager_s_per_image * (1.0 - margin)
        if fastest is not None and good[fastest] < limit:
            chosen = fastest
            why = f"{fastest} measured {report.eager_s_per_image / good[fastest]:.2f}x eager on the warm-up"
        else:
            failed = {m: r["error"] for m, r in results.items() if r.get("error")}
            why = "; ".join(
                [f"{m} failed: {e}" for m, e in failed.items()]
                + [f"{m} measured {report.eager_s_per_image / s:.2f}x eager, under the {1 / (1 - margin):.2f}x "
                   "needed" for m, s in good.items()]) or "nothing to try"
            why = f"eager: {why}"
    elif mode in CANDIDATES:
        if results[mode].get("error"):
            report.fell_back = True
            why = f"{mode} failed, running eager: {results[mode]['error']}"
        else:
            chosen, why = mode, f"{mode} asked for"

    state = getattr(model, _ATTR)
    if chosen != "compile":
        state.drop_compiled()
    if chosen != "eager":  # the compiled function was kept: re-applying it does not recompile
        set_mode(model, chosen, backend=backend, dynamic=report.dynamic)
    report.mode, report.reason = chosen, why
    report.chosen_s_per_image = results[chosen]["s_per_image"] if chosen in results else report.eager_s_per_image
    report.compile_s = results.get("compile", {}).get("compile_s")
    report.frozen = chosen == "compile" and state.compiled is not None and state.compiled.freezing
    report.compiles = compile_count(model)
    cache_after = _fx_cache_counters()
    report.cache = {k: cache_after[k] - cache_before.get(k, 0) for k in cache_after}
    (logger.warning if report.fell_back else logger.info)("%s", report.summary())
    return report


# ---------------------------------------------------------------------------


def _device_of(model) -> str:
    try:
        return next(model.parameters()).device.type
    except StopIteration:
        return "cpu"


def _fx_cache_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    inductor = counters["inductor"]
    aot = counters["aot_autograd"]
    return {**{k: int(inductor.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")},
            **{k: int(aot.get(k, 0)) for k in ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")}}


def _measure(warmup: Callable[[], Any], repeats: int, images: int) -> float | None:
    """Seconds per image: one untimed call, then the best of `repeats` (the least disturbed by other work);
    None without repeats."""
    if repeats < 1:
        return None
    warmup()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        warmup()
        best = min(best, time.perf_counter() - start)
    return best / images


def _try(model, mode: str, warmup, repeats: int, images: int, backend: str, dynamic: bool) -> dict:
    result: dict[str, Any] = {"s_per_image": None, "error": None}
    state = None
    try:
        set_mode(model, mode, backend=backend, dynamic=dynamic)
        state = getattr(model, _ATTR)
        compiles_before = state.compiles
        start = time.perf_counter()
        warmup()  # the first call compiles
        state.raise_error()
        if mode == "compile":
            result["compile_s"] = round(time.perf_counter() - start, 3)
            result["compiles"] = state.compiles - compiles_before
        settled = state.compiles
        result["s_per_image"] = _measure(warmup, repeats, images)
        state.raise_error()
        result["recompiles_in_warmup"] = state.compiles - settled
    except Exception as exc:  # any failure of a candidate means eager, never a broken replica
        result["error"] = _describe(exc, backend if mode == "compile" else None)
        result["s_per_image"] = None
        logger.debug("acceleration %s failed", mode, exc_info=True)
        if state is not None and mode == "compile":
            state.drop_compiled()
    return result


def _describe(exc: BaseException, backend: str | None) -> str:
    """One line: the exception and, for a compiler failure, what inside the compiler failed."""
    root, seen = exc, {id(exc)}
    while True:  # torch wraps a backend's exception in BackendCompilerFailed (inner_exception / __cause__)
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or id(inner) in seen:
            break
        root = inner
        seen.add(id(inner))
    text = " ".join(str(root).split())[:300]
    where = f" (backend {backend})" if backend else ""
    if root is exc:
        return f"{type(exc).__name__}{where}: {text}"
    return f"{type(exc).__name__}{where}: {type(root).__name__}: {text}"


class _State:
    """What `set_mode` changed on a model, to switch modes and back."""

    def __init__(self, model):
        self.model = model
        self.mode = "eager"
        self.compiled: _CompiledFeatures | None = None
        self._compiles_dropped = 0

    @property
    def compiles(self) -> int:
        return self._compiles_dropped + (self.compiled.compiles if self.compiled is not None else 0)

    def raise_error(self) -> None:
        wrapper = self.model.__dict__.get("extract_feat")
        error = getattr(wrapper, "error", None)
        if error is not None:
            wrapper.error = None
            raise error

    def set(self, mode: str, *, backend: str, dynamic: bool | None, freezing: bool) -> None:
        import torch

        if dynamic is None:
            dynamic = self.compiled.dynamic if self.compiled is not None else True

        model = self.model
        model.__dict__.pop("extract_feat", None)  # the class's own extract_feat again
        parts = [model.backbone] + ([model.neck] if getattr(model, "neck", None) is not None else [])
        layout = torch.channels_last if mode == "channels_last" else torch.contiguous_format
        for part in parts:
            part.to(memory_format=layout)
        if mode == "channels_last":
            model.extract_feat = _ChannelsLastFeatures(model.backbone, getattr(model, "neck", None))
        elif mode == "compile":
            if self.compiled is None or self.compiled.key != (backend, dynamic, freezing):
                self.drop_compiled()
                self.compiled = _CompiledFeatures(model.backbone, getattr(model, "neck", None), backend, dynamic,
                                                  freezing=freezing)
            model.extract_feat = self.compiled
        self.mode = mode

    def drop_compiled(self) -> None:
        if self.compiled is not None:
            self._compiles_dropped += self.compiled.compiles
            self.compiled.release()
            self.compiled = None
        if self.model.__dict__.get("extract_feat") is not None and self.mode == "compile":
            self.model.__dict__.pop("extract_feat", None)
            self.mode = "eager"


class _ShapeRecorder:
    """Eager extract_feat that notes the input sizes it sees."""

    def __init__(self, extract_feat):
        self.extract_feat = extract_feat
        self.shapes: set[tuple[int, int]] = set()

    def __call__(self, batch_inputs):
        self.shapes.add(tuple(int(d) for d in batch_inputs.shape[-2:]))
        return self.extract_feat(batch_inputs)


def _backbone_neck(backbone, neck, x):
    feats = backbone(x)
    return neck(feats) if neck is not None else feats


class _ChannelsLastFeatures:
    error = None

    def __init__(self, backbone, neck):
        self.backbone, self.neck = backbone, neck

    def __call__(self, batch_inputs):
        import torch

        try:
            feats = _backbone_neck(self.backbone, self.neck, batch_inputs.contiguous(memory_format=torch.channels_last))
            return tuple(f.contiguous() for f in feats)
        except Exception as exc:
            self.error = exc
            raise


class _CompiledFeatures:
    """backbone + neck under torch.compile, counting the graphs its backend compiles.

    Each instance compiles its own copy of `_backbone_neck`'s code object, so dynamo's per-code
    cache (and its recompile limit) belongs to one model, and dropping it frees the compiled code.
    """

    _serial = 0
    _serial_lock = threading.Lock()

    def __init__(self, backbone, neck, backend: str, dynamic: bool, freezing: bool = False):
        import torch
        import torch._inductor.config
        from torch._dynamo import lookup_backend

        self.backbone, self.neck = backbone, neck
        self.key = (backend, dynamic, freezing)
        self.dynamic, self.freezing = dynamic, freezing
        self.compiles = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._inner = lookup_backend(backend)  # an unknown backend fails here, before any model call
        # Freezing (see the top) is read by dynamo while it traces (parameters become graph constants) and by
        # inductor while it compiles, so it is set around each call: inductor's config is process-wide, and the
        # Detector runs one model per process, one call at a time.
        self._config = (lambda: torch._inductor.config.patch(freezing=True)) if freezing else contextlib.nullcontext
        with _CompiledFeatures._serial_lock:
            _CompiledFeatures._serial += 1
            serial = _CompiledFeatures._serial
        code = _backbone_neck.__code__.replace(co_name=f"_backbone_neck_{serial}")
        self._fn = types.FunctionType(code, _backbone_neck.__globals__, code.co_name)
        self._compiled = torch.compile(self._fn, backend=self._count_and_compile)

    def _count_and_compile(self, gm, example_inputs):
        with self._lock:
            self.compiles += 1
        return self._inner(gm, example_inputs)

    def __call__(self, batch_inputs):
        import torch

        if self.dynamic:
            torch._dynamo.mark_dynamic(batch_inputs, 2)
            torch._dynamo.mark_dynamic(batch_inputs, 3)
        try:
            with self._config():
                feats = self._compiled(self.backbone, self.neck, batch_inputs)
        except Exception as exc:
            self.error = exc
            raise
        return tuple(f.contiguous() for f in feats)

    def release(self) -> None:
        try:
            from torch._dynamo.eval_frame import reset_code

            reset_code(self._fn.__code__)
        except Exception:  # only memory is at stake
            pass
