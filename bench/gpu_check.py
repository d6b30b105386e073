#!/usr/bin/env python
"""GPU path check: the shipped GPU graph end to end, in one short run.

    bench/gpu_check.sh                          # a GPU box: cuda, < 8 minutes, hard timeout
    .venv/bin/python -m bench.gpu_check --device cpu --quick            # smoke run on a CPU
    .venv/bin/python -m bench.gpu_check --device cpu --quick --stages raw,geometry

(from the repository root, like every bench script). Stages, each recorded in
bench/results/gpu-check-<stamp>-<device>.json as soon as it ends:

1. preflight: torch sees CUDA, mmcv's CUDA ops run (nms on a CUDA tensor),
   Ray and the `serve` CLI are there, Ray sees a GPU and the machine has the
   CPUs the GPU config reserves. A missing CUDA, mmcv op or Ray stops the run.
2. geometry: the toy detector's boxes on synthetic scenes of mixed sizes, in a
   stacked batch and one by one, against the exact ground truth (IoU >= 0.5,
   right label, nothing spurious), and against the same model on the CPU.
3. raw: decode + BatchDetector.detect in this process, images/s at batch 1
   against stacked batches of 8 and 16, for the toy detector, RTMDet-tiny and
   Faster R-CNN (random init), on 640x480 JPEG scenes.
4. served: `serve run` on a copy of serve_config.gpu.yaml (serve_config.yaml
   with --device cpu) with only host/port and allowed_hosts changed, the model
   from the environment (CONFIG_FILE, CHECKPOINT_FILE, DEVICE, IMAGE_DIR) as
   the README starts it; images from a local HTTP server. The toy detector's
   geometry through the graph, one /predict with 32 tasks, one-task calls 8 at
   a time, served images/s against the raw floor, and the Detector's batch
   sizes from /metrics.

Exit status: 0 when every check passed, 1 when one failed, 2 when the
preflight stopped the run, 124 when interrupted (SIGINT: the shell's limit).
Measurements (batched vs batch 1, served vs raw) are recorded, not judged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file, not only with -m
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402

from bench.provenance import provenance, stamp  # noqa: E402
from bench.serving_bench import LABEL_CONFIG, Service, percentiles  # noqa: E402
from tests.model_fixtures import FASTER_RCNN, RTMDET_TINY, TOY_CHECKPOINT, TOY_CONFIG  # noqa: E402

MODELS = {"toy": str(TOY_CONFIG), "rtmdet-tiny": RTMDET_TINY, "faster-rcnn": FASTER_RCNN}
# serving_bench's LABEL_CONFIG maps the toy classes one to one.
TO_LABEL = {"car": "Car", "airplane": "Airplane", "person": "Person"}
SCORE_THR = 0.5  # the service's default score_threshold
TRUTH_IOU = 0.5
AGREE_IOU = 0.9  # a box on the device against the same box on the CPU
GEOMETRY_SIZES = [(640, 480), (480, 640), (1280, 720), (384, 288), (800, 600), (352, 320), (1024, 768), (300, 400)]
METRICS_INTERVAL_MS = 2000  # Ray exports metrics every 10 s by default: faster here, so /metrics catches up


class PreflightError(RuntimeError):
    """The machine cannot run the check at all."""


# ------------------------------------------------------------ pure helpers
def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def boxes_of(det, score_thr: float = 0.0) -> list[tuple[list[float], str, float]]:
    """(box, class name, score) of a Detections at or above score_thr."""
    if not hasattr(det, "boxes"):  # a TaskFailure
        raise RuntimeError(f"the model failed on an image: {det}")
    return [([float(v) for v in box], name, float(score))
            for box, name, score in zip(det.boxes.tolist(), det.class_names, det.scores.tolist(), strict=True)
            if score >= score_thr]


def match_truth(found: list[tuple], objects: list[dict], score_thr: float = SCORE_THR,
                iou_thr: float = TRUTH_IOU) -> dict:
    """Every ground-truth object found with its label at IoU >= iou_thr, and no
    confident box that matches no object. `found`: (box, label, score)."""
    confident = [(b, label) for b, label, s in found if s >= score_thr]
    ious, misses = [], []
    for obj in objects:
        best = max((iou(obj["bbox"], b) for b, label in confident if label == obj["label"]), default=0.0)
        ious.append(best)
        if best < iou_thr:
            misses.append({"label": obj["label"], "bbox": obj["bbox"], "best_iou": round(best, 3)})
    spurious = [{"label": label, "bbox": [round(v, 1) for v in b]} for b, label in confident
                if not any(iou(b, o["bbox"]) >= iou_thr for o in objects)]
    return {"objects": len(objects), "found": len(objects) - len(misses),
            "min_iou": round(min(ious), 3) if ious else None, "misses": misses, "spurious": spurious,
            "ok": not misses and not spurious}


def merge_truth(parts: list[dict]) -> dict:
    """match_truth over several images, summed."""
    ious = [p["min_iou"] for p in parts if p["min_iou"] is not None]
    return {"images": len(parts), "objects": sum(p["objects"] for p in parts),
            "found": sum(p["found"] for p in parts), "min_iou": min(ious) if ious else None,
            "misses": [m for p in parts for m in p["misses"]], "spurious": [s for p in parts for s in p["spurious"]],
            "ok": all(p["ok"] for p in parts)}


def compare_detections(a: list[tuple], b: list[tuple], score_thr: float = SCORE_THR, slack: float = 0.15,
                       iou_thr: float = AGREE_IOU) -> dict:
    """Do two runs of one model on one image agree? Every box at score_thr in
    one run needs a box of the same label in the other at score_thr - slack
    (a score near the threshold may land on either side) and IoU >= iou_thr."""
    max_px, max_score, min_iou, unmatched, pairs = 0.0, 0.0, 1.0, [], 0
    for one, other, side in ((a, b, "first"), (b, a, "second")):
        for box, label, score in one:
            if score < score_thr:
                continue
            cands = [(iou(box, ob), ob, os_) for ob, ol, os_ in other if ol == label and os_ >= score_thr - slack]
            best = max(cands, default=None, key=lambda c: c[0])
            if best is None or best[0] < iou_thr:
                unmatched.append({"only_in": side, "label": label, "bbox": [round(v, 1) for v in box],
                                  "score": round(score, 3), "best_iou": round(best[0], 3) if best else 0.0})
                continue
            pairs += 1
            min_iou = min(min_iou, best[0])
            max_px = max(max_px, max(abs(x - y) for x, y in zip(box, best[1], strict=True)))
            max_score = max(max_score, abs(score - best[2]))
    return {"pairs": pairs, "unmatched": unmatched, "min_iou": round(min_iou, 4), "max_abs_px": round(max_px, 3),
            "max_abs_score": round(max_score, 4), "ok": not unmatched}


def merge_agreement(parts: list[dict]) -> dict:
    return {"images": len(parts), "pairs": sum(p["pairs"] for p in parts),
            "unmatched": [u for p in parts for u in p["unmatched"]],
            "min_iou": min((p["min_iou"] for p in parts), default=1.0),
            "max_abs_px": max((p["max_abs_px"] for p in parts), default=0.0),
            "max_abs_score": max((p["max_abs_score"] for p in parts), default=0.0),
            "ok": all(p["ok"] for p in parts)}


def regions_to_boxes(regions: list[dict]) -> list[tuple[list[float], str, float]]:
    """Label Studio rectangle regions (percent of the image) as pixel boxes."""
    out = []
    for r in regions:
        v, w, h = r["value"], r["original_width"], r["original_height"]
        box = [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]
        out.append((box, v["rectanglelabels"][0], float(r.get("score", 1.0))))
    return out


_BUCKET = re.compile(r'^ray_mmdet_ls_model_batch_size_bucket\{.*le="([^"]+)".*\}\s+([0-9.e+-]+)$')


def parse_batch_metrics(text: str) -> dict:
    """The Detector's batch-size histogram in a /metrics text, summed over
    replicas: {"count": batches, "buckets": {upper bound: cumulative count}}.
    (Its _sum is not read: Ray 2.60 records each value as its bucket's
    midpoint, so a batch of 1 adds 0.5.)"""
    buckets: dict[float, float] = {}
    count = 0.0
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m:
            bound = float(m.group(1))
            buckets[bound] = buckets.get(bound, 0.0) + float(m.group(2))
        elif line.startswith("ray_mmdet_ls_model_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return {"count": count, "buckets": buckets}


def batch_delta(before: dict, after: dict, images: int) -> dict:
    """The batches that `images` images formed between two parse_batch_metrics
    readings: how many, the mean size, and how many per histogram bucket
    ("<=4": batches of 4 or fewer, over the bucket below)."""
    def cumulative(buckets: dict, bound: float) -> float:  # a bound a reading lacks: the one below it
        return max((v for b, v in buckets.items() if b <= bound), default=0.0)

    count = int(round(after["count"] - before["count"]))
    per, prev, prev_bound = {}, 0.0, 0.0
    for bound in sorted(set(after["buckets"]) | set(before["buckets"])):
        cum = cumulative(after["buckets"], bound) - cumulative(before["buckets"], bound)
        if cum - prev > 0:
            per[f">{prev_bound:g}" if bound == float("inf") else f"<={bound:g}"] = int(round(cum - prev))
        prev, prev_bound = cum, bound
    ones = cumulative(after["buckets"], 1.0) - cumulative(before["buckets"], 1.0)
    return {"batches": count, "mean_batch": round(images / count, 2) if count > 0 else None, "histogram": per,
            "batches_over_1": count - int(round(ones))}


def summarize_raw(rows: list[dict]) -> dict:
    """Best row, and the best stacked batch's speed-up over batch 1."""
    best = max(rows, key=lambda r: r["images_per_s"])
    one = next((r for r in rows if r["batch"] == 1), None)
    stacked = [r for r in rows if r["batch"] > 1 and r["stacked"]]
    top = max(stacked, key=lambda r: r["images_per_s"], default=None)
    out = {"best": best}
    if one and top:
        out["stacked_vs_batch1"] = round(top["images_per_s"] / one["images_per_s"], 3)
        out["stacked_vs_batch1_model_only"] = round(top["model_images_per_s"] / one["model_images_per_s"], 3)
    return out


# ----------------------------------------------------------------- stages
def preflight(device: str, served: bool) -> dict:
    """What the machine has. Raises PreflightError for what stops every stage;
    returns problems that stop only the served stage under "served_blockers"."""
    info: dict = {"device": device, "notes": [], "served_blockers": []}
    try:
        import torch
    except ImportError as exc:
        raise PreflightError(f"torch is not importable: {exc}") from None
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    gpu = device.startswith("cuda")
    if gpu:
        if not torch.cuda.is_available():
            raise PreflightError(f"torch {torch.__version__} sees no CUDA device (built for CUDA "
                                 f"{torch.version.cuda}): a CPU-only torch, no driver, or CUDA_VISIBLE_DEVICES hides "
                                 "the GPU")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise PreflightError(f"{device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    else:
        info["notes"].append(f"CUDA preflight skipped (--device {device})")
    try:
        import mmcv
        import mmdet
        from mmcv import ops
    except ImportError as exc:
        raise PreflightError(f"mmcv/mmdet not importable ({exc}); mmcv must be the full build with ops "
                             "(`mim install mmcv` or a wheel from download.openmmlab.com matching torch and CUDA)"
                             ) from None
    info["mmcv"], info["mmdet"] = mmcv.__version__, mmdet.__version__
    try:
        info["mmcv_compiled_cuda"] = ops.get_compiling_cuda_version()
    except Exception as exc:
        info["mmcv_compiled_cuda"] = f"unknown ({type(exc).__name__})"
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    try:
        _, keep = ops.nms(boxes.to(device), scores.to(device), 0.5)
        if sorted(keep.cpu().tolist()) != [0, 2]:
            raise RuntimeError(f"kept {keep.tolist()}, expected [0, 2]")
        info["mmcv_nms_on_device"] = "ok"
    except Exception as exc:
        raise PreflightError(f"mmcv.ops.nms on {device} failed ({type(exc).__name__}: {exc}); mmcv was compiled "
                             f"for CUDA {info['mmcv_compiled_cuda']} and torch for {torch.version.cuda}: install the "
                             "mmcv build for this torch and CUDA") from None
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise PreflightError(f"Ray Serve is not importable ({exc}): pip install 'ray[serve]'") from None
    info["ray"] = ray.__version__
    if not served:
        return info
    serve_bin = Path(sys.executable).parent / "serve"
    if not serve_bin.is_file():
        info["served_blockers"].append(f"no `serve` CLI next to {sys.executable} (bench/serving_bench.Service "
                                       "starts that one): run with the Python of the environment Ray is installed in")
    shipped = "serve_config.gpu.yaml" if gpu else "serve_config.yaml"
    need = reserved_cpus(yaml.safe_load((ROOT / shipped).read_text()))
    try:  # what Ray will count (a container's CPU quota included)
        from ray._private.utils import get_num_cpus

        cpus = get_num_cpus()
    except Exception:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    info["config_cpus_reserved"], info["ray_cpus"] = need, cpus
    if need > cpus:
        info["served_blockers"].append(f"{shipped} reserves {need:g} CPUs and Ray counts {cpus} here: it would "
                                       "never place every replica (lower num_cpus/num_replicas in it)")
    if gpu:
        try:
            from ray._private.accelerators import NvidiaGPUAcceleratorManager

            seen = NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()
            info["ray_gpus_detected"] = seen
            if not seen:
                info["served_blockers"].append("Ray detects no NVIDIA GPU on this node, so the Detector "
                                               "(num_gpus: 1) would never be placed")
        except Exception as exc:  # a private API: only a note if it moved
            info["notes"].append(f"could not ask Ray which GPUs it sees ({type(exc).__name__})")
    return info


def reserved_cpus(config: dict) -> float:
    """CPUs a serve config's deployments reserve, over their replicas."""
    total = 0.0
    for app in config.get("applications", []):
        for dep in app.get("deployments", []):
            replicas = dep.get("num_replicas", 1)
            replicas = replicas if isinstance(replicas, int) else 1
            if "autoscaling_config" in dep:
                replicas = dep["autoscaling_config"].get("min_replicas", 1)
            total += replicas * float((dep.get("ray_actor_options") or {}).get("num_cpus", 1))
    return total


def write_scenes(directory: Path, n_floor: int, n_geometry: int) -> tuple[list[str], dict]:
    """JPEG scenes: n_floor at 640x480 (throughput) and n_geometry of mixed
    sizes (geometry). Returns the throughput names and {name: (size, objects)}."""
    from tests.toy_detector.scenes import make_scene

    directory.mkdir(parents=True, exist_ok=True)
    floor, truth = [], {}
    for i in range(n_floor):
        name = f"floor{i}.jpg"
        image, objects = make_scene(8100 + i, 640, 480)
        image.save(directory / name, quality=90)
        floor.append(name)
    for i in range(n_geometry):
        size = GEOMETRY_SIZES[i % len(GEOMETRY_SIZES)]
        name = f"geom{i}.jpg"
        image, objects = make_scene(7100 + i, *size)
        image.save(directory / name, quality=92)
        truth[name] = (size, objects)
    return floor, truth


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def raw_floor(config: str, checkpoint: str, device: str, blobs: list[bytes], batch_sizes: list[int],
              n_images: int, row_budget_s: float) -> dict:
    """decode + BatchDetector.detect in this process: one row per batch size
    (batch 1, then stacked batches), each over n_images (fewer if the row would
    pass row_budget_s)."""
    import torch

    from mmdet_ls.images import decode_image
    from mmdet_ls.inference import BatchDetector
    from mmdet_ls.model_files import resolve_config_file

    started = time.perf_counter()
    det = BatchDetector(resolve_config_file(config), checkpoint, device)
    load_s = time.perf_counter() - started
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats(det.device)
    rows = []
    for batch in batch_sizes:
        stacked = batch > 1
        chunk = [blobs[j % len(blobs)] for j in range(batch)]
        det.detect([decode_image(b).bgr for b in chunk], stacked=stacked)  # warm-up at this shape
        _sync(device)
        done, decode_s, model_s = 0, 0.0, 0.0
        while done < n_images:
            part = [blobs[(done + j) % len(blobs)] for j in range(batch)]
            t0 = time.perf_counter()
            images = [decode_image(b).bgr for b in part]
            t1 = time.perf_counter()
            results = det.detect(images, stacked=stacked)
            _sync(device)
            decode_s, model_s = decode_s + t1 - t0, model_s + time.perf_counter() - t1
            failed = [r for r in results if not hasattr(r, "boxes")]
            if failed:
                raise RuntimeError(f"batch {batch}: {failed[0]}")
            done += batch
            if decode_s + model_s > row_budget_s:
                break
        rows.append({"batch": batch, "stacked": stacked, "images": done,
                     "images_per_s": round(done / (decode_s + model_s), 3),
                     "model_images_per_s": round(done / model_s, 3),
                     "decode_ms_per_image": round(1000 * decode_s / done, 2)})
    out = {"device": det.device, "load_s": round(load_s, 2), "rows": rows, **summarize_raw(rows)}
    if gpu:
        out["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(det.device) / 2**20)
    del det
    if gpu:
        torch.cuda.empty_cache()
    return out


def geometry(device: str, directory: Path, truth: dict) -> dict:
    """The toy detector on the device, stacked and one by one, against ground
    truth, and against itself on the CPU."""
    import torch

    from mmdet_ls.images import decode_image
    from mmdet_ls.inference import BatchDetector

    names = list(truth)
    images = [decode_image((directory / n).read_bytes()).bgr for n in names]
    det = BatchDetector(str(TOY_CONFIG), str(TOY_CHECKPOINT), device)
    stacked = [boxes_of(d) for d in det.detect(images, stacked=True)]
    single = [boxes_of(d) for d in det.detect(images, stacked=False)]
    out = {"device": det.device, "scenes": {n: list(truth[n][0]) for n in names}}
    del det
    for key, found in (("stacked_vs_truth", stacked), ("single_vs_truth", single)):
        out[key] = merge_truth([match_truth(f, truth[n][1]) for f, n in zip(found, names, strict=True)])
    out["stacked_vs_single"] = merge_agreement([compare_detections(a, b) for a, b in zip(stacked, single, strict=True)])
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        cpu = BatchDetector(str(TOY_CONFIG), str(TOY_CHECKPOINT), "cpu")
        reference = [boxes_of(d) for d in cpu.detect(images, stacked=False)]
        pairs = zip(stacked, reference, strict=True)
        out["device_vs_cpu"] = merge_agreement([compare_detections(a, b) for a, b in pairs])
    else:
        out["device_vs_cpu"] = {"skipped": f"the device is {device}"}
    return out


# ------------------------------------------------------------------ served
class ShippedService(Service):
    """`serve run` on a copy of the shipped config with only host/port and
    allowed_hosts changed; the model and device come from the environment,
    as the README starts the service (bench.serving_bench.Service does the rest)."""

    def __init__(self, tmp: Path, device: str, env: dict):
        from tests.serve_fixtures import free_port

        self.shipped = "serve_config.gpu.yaml" if device.startswith("cuda") else "serve_config.yaml"
        base = yaml.safe_load((ROOT / self.shipped).read_text())
        self.port = free_port()
        base["http_options"]["host"], base["http_options"]["port"] = "127.0.0.1", self.port
        base["applications"][0].setdefault("args", {})["allowed_hosts"] = ["127.0.0.1"]
        self.config = tmp / f"serve_config.gpu-check.{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(base, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.env = {**env, "RAY_metrics_report_interval_ms": str(METRICS_INTERVAL_MS)}

    def __enter__(self):
        try:
            with patched_environ(self.env):  # Service.__enter__ hands os.environ to `serve run`
                return super().__enter__()
        except BaseException:  # e.g. the shell's timeout (SIGINT) while waiting for ready
            if self.proc is not None and self.proc.poll() is None:
                self.__exit__(None, None, None)
            raise

    def detector_device(self) -> str | None:
        """The device the Detector replica reported in its ready log line."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        found = re.findall(r"Detector ready on (\S+)", text)
        return found[-1] if found else None

    def metrics(self) -> dict:
        return parse_batch_metrics(requests.get(f"{self.url}/metrics", timeout=10).text)

    def settled_metrics(self, min_count: float, timeout_s: float = 20.0) -> dict:
        """/metrics once Ray has exported every batch so far: at least
        min_count batches, and no change for two export intervals."""
        deadline = time.monotonic() + timeout_s
        last, held_since = self.metrics(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.metrics()
            if now["count"] != last["count"]:
                last, held_since = now, time.monotonic()
            elif last["count"] >= min_count and time.monotonic() - held_since >= 2 * METRICS_INTERVAL_MS / 1000:
                break
        return last

    def predict_results(self, urls: list[str]) -> list[dict]:
        tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]
        resp = requests.post(f"{self.url}/predict", timeout=300,
                             json={"tasks": tasks, "project": "1.1", "label_config": LABEL_CONFIG})
        resp.raise_for_status()
        return resp.json()["results"]


@contextmanager
def patched_environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def served(name: str, config: str, checkpoint: str, device: str, tmp: Path, server_url: str, floor_names: list[str],
           truth: dict | None, floor: dict | None, n_predict: int, concurrency: int, n_calls: int) -> dict:
    env = {"CONFIG_FILE": config, "CHECKPOINT_FILE": checkpoint, "IMAGE_DIR": str(tmp / "uploads"),
           "DEVICE": "cuda" if device.startswith("cuda") else device}
    out: dict = {"env": env}
    svc = ShippedService(tmp, device, env)
    try:
        _serve_and_measure(svc, out, server_url, floor_names, truth, n_predict, concurrency, n_calls)
    except Exception as exc:
        log = Path(str(svc.config) + ".log")
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
        return {**out, "error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
    if floor and "rows" in floor:
        best = floor["best"]["images_per_s"]
        out["predict_n"]["vs_raw_floor"] = round(out["predict_n"]["images_per_s"] / best, 3)
        out["concurrent"]["vs_raw_floor"] = round(out["concurrent"]["images_per_s"] / best, 3)
    return out


def _serve_and_measure(svc: ShippedService, out: dict, server_url: str, floor_names: list[str], truth: dict | None,
                       n_predict: int, concurrency: int, n_calls: int) -> None:
    started = time.perf_counter()
    with svc:
        out["config"] = svc.shipped
        out["ready_s"] = round(time.perf_counter() - started, 1)
        out["detector_device"] = svc.detector_device()
        urls = [f"{server_url}/{n}" for n in floor_names]
        svc.predict(urls[:2])  # warm-up
        if truth is not None:
            names = list(truth)
            items = svc.predict_results([f"{server_url}/{n}" for n in names])
            parts = []
            for n, item in zip(names, items, strict=True):
                if "error" in item:
                    parts.append({"objects": len(truth[n][1]), "found": 0, "min_iou": None, "misses": [item["error"]],
                                  "spurious": [], "ok": False})
                    continue
                mapped = [{"bbox": o["bbox"], "label": TO_LABEL[o["label"]]} for o in truth[n][1]]
                parts.append(match_truth(regions_to_boxes(item["result"]), mapped, score_thr=0.0))
            out["geometry"] = merge_truth(parts)
        # Each phase's batches, between readings taken once Ray exported them all.
        before = svc.settled_metrics(1)
        elapsed = svc.predict([urls[i % len(urls)] for i in range(n_predict)])
        after = svc.settled_metrics(before["count"] + 1)
        out["predict_n"] = {"tasks": n_predict, "seconds": round(elapsed, 3),
                            "images_per_s": round(n_predict / elapsed, 3), **batch_delta(before, after, n_predict)}
        before = after
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda i: svc.predict([urls[i % len(urls)]]), range(n_calls)))
        elapsed = time.perf_counter() - t0
        after = svc.settled_metrics(before["count"] + 1)
        out["concurrent"] = {"concurrency": concurrency, "calls": n_calls, "images_per_s": round(n_calls / elapsed, 3),
                             **{k: round(v, 1) for k, v in percentiles(latencies).items()},
                             **batch_delta(before, after, n_calls)}


# -------------------------------------------------------------------- main
def checks_of(results: dict) -> list[dict]:
    """Pass/fail lines from a result; measurements are not judged."""
    checks = []

    def add(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    if "interrupted" in results:
        add("completed", False, results["interrupted"])
    pre = results.get("preflight", {})
    if "error" in pre:
        add("preflight", False, pre["error"])
    elif pre:
        add("preflight", True, "; ".join(pre.get("notes", [])) or "CUDA, mmcv CUDA ops and Ray present")
    for name, raw in results.get("raw", {}).items():
        if "error" in raw or "skipped" in raw:
            add(f"raw {name}", "error" not in raw, raw.get("error") or raw["skipped"])
    geo = results.get("geometry", {})
    if "error" in geo:
        add("geometry", False, geo["error"])
    for key in ("stacked_vs_truth", "single_vs_truth"):
        if key in geo:
            g = geo[key]
            add(f"geometry {key}", g["ok"], f"{g['found']}/{g['objects']} objects (min IoU {g['min_iou']}), "
                f"{len(g['spurious'])} spurious")
    for key in ("stacked_vs_single", "device_vs_cpu"):
        a = geo.get(key, {})
        if "ok" in a:
            add(f"geometry {key}", a["ok"], f"{a['pairs']} boxes, {len(a['unmatched'])} unmatched, "
                f"max {a['max_abs_px']} px, min IoU {a['min_iou']}")
    gpu = results.get("device", "").startswith("cuda")
    for name, s in results.get("served", {}).items():
        if "error" in s or "skipped" in s:
            add(f"served {name}", "skipped" in s and "error" not in s, s.get("error") or s["skipped"])
            continue
        add(f"served {name} answered", True, f"{s['config']} ready in {s['ready_s']} s")
        if gpu:
            dev = s.get("detector_device")
            add(f"served {name} on cuda", bool(dev and dev.startswith("cuda")), f"Detector ready on {dev}")
            p = s["predict_n"]
            add(f"served {name} batches formed", p.get("batches_over_1", 0) > 0,
                f"/predict of {p['tasks']}: {p.get('batches')} batches, mean {p.get('mean_batch')}, "
                f"{p.get('histogram')}")
        if "geometry" in s:
            g = s["geometry"]
            add(f"served {name} geometry", g["ok"], f"{g['found']}/{g['objects']} objects (min IoU {g['min_iou']}), "
                f"{len(g['spurious'])} spurious")
    return checks


def print_table(results: dict) -> None:
    pre = results.get("preflight", {})
    gpu = pre.get("gpu", {}).get("name", "")
    print(f"\n== GPU check, {results['device']} {gpu} ==")
    print(f"{'model':<12} {'row':<30} {'img/s':>8} {'model img/s':>11} {'vs b=1':>7} {'vs raw':>7} {'batches':>26}")
    for name, raw in results.get("raw", {}).items():
        if "rows" not in raw:
            continue
        one = next((r for r in raw["rows"] if r["batch"] == 1), raw["rows"][0])
        for r in raw["rows"]:
            label = f"raw b={r['batch']}{' stacked' if r['stacked'] else ''}"
            print(f"{name:<12} {label:<30} {r['images_per_s']:8.2f} {r['model_images_per_s']:11.2f} "
                  f"{r['images_per_s'] / one['images_per_s']:7.2f}")
    for name, s in results.get("served", {}).items():
        for key, label in (("predict_n", "served one /predict"), ("concurrent", "served one-task calls")):
            p = s.get(key)
            if not p:
                continue
            shape = f"N={p['tasks']}" if key == "predict_n" else f"C={p['concurrency']}"
            batches = f"{p.get('batches')} x {p.get('mean_batch')} {p.get('histogram')}"
            print(f"{name:<12} {label + ' ' + shape:<30} {p['images_per_s']:8.2f} {'':>11} {'':>7} "
                  f"{p.get('vs_raw_floor', float('nan')):7.2f} {batches[:60]}")
    print()
    for c in results.get("checks", []):
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke run)")
    p.add_argument("--quick", action="store_true", help="the toy detector only, few images: a smoke run")
    p.add_argument("--stages", default="raw,geometry,served", help="comma list of raw, geometry, served")
    p.add_argument("--models", help="raw floor models (default toy,rtmdet-tiny,faster-rcnn; --quick: toy)")
    p.add_argument("--served-models", help="models served end to end (default toy,faster-rcnn; --quick: toy)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=440.0, help="stop starting new work after this many seconds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args(argv)
    start = time.monotonic()
    gpu = opts.device.startswith("cuda")
    for key in ("NO_PROXY", "no_proxy"):  # the local servers, past any proxy the box sets
        os.environ[key] = ",".join(v for v in (os.environ.get(key), "127.0.0.1,localhost") if v)
    stages = {s.strip() for s in opts.stages.split(",") if s.strip()}
    raw_models = (opts.models or ("toy" if opts.quick else "toy,rtmdet-tiny,faster-rcnn")).split(",")
    served_models = (opts.served_models or ("toy" if opts.quick else "toy,faster-rcnn")).split(",")
    unknown = set(raw_models + served_models) - set(MODELS)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; one of {', '.join(MODELS)}")
    if gpu:
        batch_sizes, n_raw, n_floor = ([1, 8] if opts.quick else [1, 8, 16]), (16 if opts.quick else 64), 16
        n_geometry, n_predict, concurrency, n_calls = (4 if opts.quick else 8), 32, 8, (16 if opts.quick else 64)
    else:
        batch_sizes, n_raw, n_floor = ([1, 4] if opts.quick else [1, 8, 16]), (4 if opts.quick else 32), 4
        n_geometry, n_predict, concurrency, n_calls = (3 if opts.quick else 8), (8 if opts.quick else 32), \
            (4 if opts.quick else 8), (8 if opts.quick else 32)
    left = lambda: opts.budget_s - (time.monotonic() - start)  # noqa: E731

    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-check-{stamp()}-{opts.device.replace(':', '')}.json"
    results: dict = {"provenance": provenance(vars(opts)), "device": opts.device, "quick": opts.quick,
                     "stages": sorted(stages)}

    def save():
        results["elapsed_s"] = round(time.monotonic() - start, 1)
        results["checks"] = checks_of(results)
        results["passed"] = all(c["ok"] for c in results["checks"])
        path.write_text(json.dumps(results, indent=2, default=str))

    try:
        results["preflight"] = preflight(opts.device, "served" in stages)
    except PreflightError as exc:
        results["preflight"] = {"error": str(exc)}
        save()
        print(f"gpu_check: preflight failed: {exc}", file=sys.stderr)
        print(f"wrote {path}")
        return 2
    for note in results["preflight"]["notes"]:
        print(f"note: {note}", flush=True)
    save()

    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    from tests.model_fixtures import save_random_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        image_dir = tmp / "images"
        floor_names, truth = write_scenes(image_dir, n_floor, n_geometry)
        blobs = [(image_dir / n).read_bytes() for n in floor_names]
        checkpoints = {"toy": str(TOY_CHECKPOINT)}
        for name in set(raw_models + served_models) - {"toy"}:
            checkpoints[name] = str(save_random_checkpoint(MODELS[name], tmp / f"{name}.pth"))

        if "geometry" in stages:
            print(f"[geometry] toy detector on {opts.device}, {len(truth)} scenes ...", flush=True)
            try:
                results["geometry"] = geometry(opts.device, image_dir, truth)
            except Exception as exc:
                results["geometry"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
        if "raw" in stages:
            results["raw"] = {}
            for name in raw_models:
                if left() < (150 if gpu else 60):
                    results["raw"][name] = {"skipped": f"{left():.0f} s of the budget left"}
                    continue
                print(f"[raw] {name} on {opts.device}: batch sizes {batch_sizes}, {n_raw} images each ...", flush=True)
                try:
                    results["raw"][name] = raw_floor(MODELS[name], checkpoints[name], opts.device, blobs, batch_sizes,
                                                     n_raw, row_budget_s=20.0 if gpu else 60.0)
                except Exception as exc:
                    results["raw"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                save()
        if "served" in stages:
            from tests.image_server import ImageServer

            results["served"] = {}
            blockers = results["preflight"]["served_blockers"]
            with ImageServer(image_dir) as server:
                for name in served_models:
                    if blockers:
                        results["served"][name] = {"error": "; ".join(blockers)}
                        continue
                    if left() < (120 if gpu else 90):
                        results["served"][name] = {"skipped": f"{left():.0f} s of the budget left"}
                        continue
                    print(f"[served] {name}: serve run, one /predict of {n_predict}, {n_calls} one-task calls "
                          f"{concurrency} at a time ...", flush=True)
                    try:
                        results["served"][name] = served(
                            name, MODELS[name], checkpoints[name], opts.device, tmp, server.url, floor_names,
                            truth if name == "toy" else None, results.get("raw", {}).get(name),
                            n_predict, concurrency, n_calls)
                    except Exception as exc:
                        results["served"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    save()
    except KeyboardInterrupt:  # the shell's hard limit (SIGINT): keep what finished
        results["interrupted"] = f"interrupted (SIGINT) after {time.monotonic() - start:.0f} s"
    finally:
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    print(f"\nwrote {path} ({results['elapsed_s']:.0f} s)")
    if "interrupted" in results:
        return 124
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
