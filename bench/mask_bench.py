#!/usr/bin/env python
"""What instance masks cost per image against boxes only: same model, same images, one run, CPU.

    .venv/bin/python -m bench.mask_bench                       # toy RTMDet-Ins, 48 scenes (est. 3-4 min, 2 idle cores)
    .venv/bin/python -m bench.mask_bench --images 4 --checkpoint other.pth --out /tmp/maskbench   # smoke run

(from the repository root, like every bench script.)

Model: tests/toy_detector/rtmdet_ins_toy.py + rtmdet_ins_toy_3class.pth (--config,
--checkpoint). Images: N held-out synthetic scenes with real objects
(scenes.make_scene_with_masks, seeds 3000000.., 640x480 PNG) from a local HTTP
server. Two label configs, the only thing that differs between the paths:
"box" (RectangleLabels) and "mask" (RectangleLabels + PolygonLabels +
BrushLabels: polygons and brush RLE are computed).

1. Raw floor, one process, eager, torch threads = the usable cores, images
   one at a time, per path: decode (mmdet_ls.images.decode_image) +
   BatchDetector.detect([bgr], stacked=False) (what the Detector runs) +
   mmdet_ls.regions.image_result with the path's targets (what the
   Postprocess runs, at its threshold and polygon settings). The paths
   alternate image by image (box-mask, mask-box, ...); the floor is measured
   before and after the service and the two are pooled. Also: ms of the
   regions step alone, regions and their JSON bytes, and, from the same
   detections, the bytes of masks the Detector ships (sum of MaskCrop.nbytes)
   against full masks (N_inst x H x W).
2. Served: `serve run` on the shipped serve_config.yaml (bench.serving_bench.Service:
   only host/port and allowed_hosts changed; CONFIG_FILE, CHECKPOINT_FILE and
   MODEL_ACCELERATION=eager from the environment), per path: one /predict with
   all N tasks (Label Studio's "Retrieve predictions") and N one-task calls C
   at a time (annotators opening tasks), `label_config` in the body; paths in
   ABBA order. images/s, served/raw ratio per path and shape, mask ratio minus
   box ratio, regions returned (against the raw floor's), bytes of the answers.
Results: bench/results/masks-<stamp>.json with provenance and a `summary`.
Run it on an otherwise idle machine: the table warns when the 1-min load was
above 0.5 at the start, when the raw floor moved by > 10 % between before and
after, and when the mask path returned no polygon or brush region.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.provenance import provenance, stamp
from bench.serving_bench import Service, percentiles
from tests.image_server import ImageServer
from tests.model_fixtures import TOY_INS_CHECKPOINT, TOY_INS_CONFIG

ROOT = Path(__file__).resolve().parent.parent
SEED0 = 3_000_000  # held out: training used 0..1999 and 500000.., evaluation 1000000.. and 2000000..
WIDTH, HEIGHT = 640, 480
MAX_RATIO_GAP = 0.05  # the bound on |mask ratio - box ratio|
DRIFT_WARN = 0.10  # raw floor after / before the service further from 1 than this: warn
BUSY_LOAD = 0.5  # 1-min load average at the start above this: warn

_LABELS = ('<Label value="Car" predicted_values="car"/><Label value="Plane" predicted_values="airplane"/>'
           '<Label value="Person" predicted_values="person"/>')
_BOXES = f'<RectangleLabels name="box" toName="image">{_LABELS}</RectangleLabels>'
_POLYGONS = f'<PolygonLabels name="outline" toName="image">{_LABELS}</PolygonLabels>'
_BRUSHES = f'<BrushLabels name="paint" toName="image">{_LABELS}</BrushLabels>'
LABEL_CONFIGS = {
    "box": f'<View><Image name="image" value="$image"/>{_BOXES}</View>',
    "mask": f'<View><Image name="image" value="$image"/>{_BOXES}{_POLYGONS}{_BRUSHES}</View>',
}
PATHS = tuple(LABEL_CONFIGS)
SHAPES = ("predict_n", "one_task_calls")


# ------------------------------------------------------------ pure helpers
def make_scenes(directory: Path, count: int, seed0: int = SEED0) -> list[str]:
    """`count` held-out scenes with real objects, as PNG files; their names."""
    from tests.toy_detector.scenes import make_scene_with_masks

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        names.append(f"scene{seed0 + i}.png")
        make_scene_with_masks(seed0 + i, WIDTH, HEIGHT)[0].save(directory / names[-1])
    return names


def region_counts(regions) -> dict:
    """Regions by type (rectanglelabels, polygonlabels, brushlabels) and in all."""
    counts = Counter(r["type"] for r in regions)
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}


def add_counts(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    return {k: a.get(k, 0) + b.get(k, 0) for k in keys}


def mask_traffic(masks, width: int, height: int) -> dict:
    """What one image's masks weigh between the Detector and the Postprocess:
    the MaskCrops it ships against the model's full masks (N x H x W, as bool
    and as packed bits)."""
    n = len(masks or [])
    return {"instances": n, "crop_bytes": sum(m.nbytes for m in masks or []),
            "full_bool_bytes": n * width * height, "full_bits_bytes": n * -(-width * height // 8)}


def traffic_totals(rows: list[dict]) -> dict:
    total = {k: sum(r[k] for r in rows) for k in ("instances", "crop_bytes", "full_bool_bytes", "full_bits_bytes")}
    per_image = [r["crop_bytes"] for r in rows]
    return {**total, "images": len(rows),
            "crop_bytes_per_image_mean": total["crop_bytes"] / max(1, len(rows)),
            "crop_bytes_per_image_max": max(per_image, default=0),
            "instances_per_image_mean": total["instances"] / max(1, len(rows)),
            "crop_over_full_bool": total["crop_bytes"] / total["full_bool_bytes"] if total["full_bool_bytes"] else None,
            "crop_over_full_bits": total["crop_bytes"] / total["full_bits_bytes"] if total["full_bits_bytes"] else None}


def pool_rates(points: list[dict]) -> dict:
    """Several timed runs of the same work as one: images over seconds."""
    images, seconds = sum(p["images"] for p in points), sum(p["seconds"] for p in points)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None}


def ratio_summary(raw: dict, served: dict, max_gap: float = MAX_RATIO_GAP) -> dict:
    """Per traffic shape: served/raw images/s per path, mask minus box, and
    whether it is within `max_gap`. raw: {path: images_per_s};
    served: {shape: {path: images_per_s}}."""
    out = {}
    for shape, rates in served.items():
        box, mask = rates["box"] / raw["box"], rates["mask"] / raw["mask"]
        out[shape] = {"box_ratio": round(box, 4), "mask_ratio": round(mask, 4), "ratio_gap": round(mask - box, 4),
                      "within_0_05": abs(mask - box) <= max_gap}
    return out


# -------------------------------------------------------------- raw floor
def raw_floor_main(opts) -> None:
    """Subprocess mode: both paths in this one process, images one at a time; print JSON."""
    import torch

    torch.set_num_threads(opts.threads)
    import cv2

    cv2.setNumThreads(opts.threads)
    from mmdet_ls.images import decode_image
    from mmdet_ls.inference import BatchDetector
    from mmdet_ls.label_config import parse_label_config
    from mmdet_ls.model_files import resolve_config_file
    from mmdet_ls.regions import MaskStyle, image_result
    from mmdet_ls.settings import polygon_settings, score_threshold

    threshold, style = score_threshold(None), MaskStyle(*polygon_settings(None))  # the Postprocess's defaults
    targets = {path: parse_label_config(LABEL_CONFIGS[path]).targets for path in PATHS}
    blobs = [Path(p).read_bytes() for p in opts.image_files]
    det = BatchDetector(resolve_config_file(opts.config), opts.checkpoint, "cpu", acceleration="eager")

    def one(path: str, blob: bytes):
        start = time.perf_counter()
        detections = det.detect([decode_image(blob).bgr], stacked=False)[0]
        if not hasattr(detections, "boxes"):
            raise RuntimeError(f"detection failed: {detections}")
        middle = time.perf_counter()
        result = image_result(detections, targets[path], threshold, style=style)
        end = time.perf_counter()
        return detections, result, end - start, end - middle

    for path in PATHS:  # warm-up
        one(path, blobs[0])
    stats = {path: {"seconds": 0.0, "regions_s": [], "model_s": 0.0, "regions": {}, "regions_json_bytes": 0}
             for path in PATHS}
    traffic = []
    for rep in range(opts.passes):
        for i, blob in enumerate(blobs):
            for path in (PATHS if (i + rep) % 2 == 0 else PATHS[::-1]):  # alternate which path goes first
                detections, result, seconds, regions_s = one(path, blob)
                s = stats[path]
                s["seconds"] += seconds
                s["regions_s"].append(regions_s)
                s["model_s"] += detections.timings.get("model_s", 0.0)
                if rep == 0:
                    s["regions"] = add_counts(s["regions"], region_counts(result.regions))
                    s["regions_json_bytes"] += len(json.dumps(result.regions, separators=(",", ":")))
                    if path == "mask":
                        traffic.append(mask_traffic(detections.masks, detections.width, detections.height))
    out = {"threads": opts.threads, "passes": opts.passes, "score_threshold": threshold,
           "mask_style": {"tolerance_px": style.tolerance_px, "max_points": style.max_points},
           "acceleration": det.acceleration_report, "paths": {}, "mask_traffic": traffic}
    for path, s in stats.items():
        n = len(s["regions_s"])
        out["paths"][path] = {
            "images": n, "seconds": s["seconds"], "images_per_s": n / s["seconds"],
            "ms_per_image": 1000 * s["seconds"] / n, "model_ms_per_image": 1000 * s["model_s"] / n,
            "regions_ms_per_image": 1000 * sum(s["regions_s"]) / n,
            "regions_ms_p50": percentiles(s["regions_s"])["p50_ms"], "regions_ms_max": 1000 * max(s["regions_s"]),
            "regions_first_pass": s["regions"], "regions_json_bytes_first_pass": s["regions_json_bytes"]}
    print("MASK_FLOOR " + json.dumps(out), flush=True)


def measure_floor(config: str, checkpoint: str, files: list[str], threads: int, passes: int) -> dict:
    cmd = [sys.executable, "-m", "bench.mask_bench", "--raw-floor", "--config", config, "--checkpoint", checkpoint,
           "--threads", str(threads), "--floor-passes", str(passes), "--image-files", *files]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((text for text in out.stdout.splitlines() if text.startswith("MASK_FLOOR ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("MASK_FLOOR "):])


# ---------------------------------------------------------------- served
class Caller:
    """/predict with a given label config; every answer's items, regions and bytes are kept."""

    def __init__(self, svc: Service):
        self.svc = svc
        self.next_id = 1

    def predict(self, urls: list[str], label_config: str, session=None) -> dict:
        tasks = []
        for u in urls:
            tasks.append({"id": self.next_id, "data": {"image": u}})  # distinct ids, as Label Studio's
            self.next_id += 1
        body = {"tasks": tasks, "project": "1.1", "label_config": label_config}
        start = time.perf_counter()
        resp = (session or requests).post(f"{self.svc.url}/predict", json=body, timeout=300)
        elapsed = time.perf_counter() - start
        items = resp.json().get("results", []) if resp.status_code == 200 else []
        if len(items) != len(urls):
            raise RuntimeError(f"bad answer: {resp.status_code} {resp.text[:300]}")
        regions = [r for item in items for r in item.get("result", [])]
        return {"seconds": elapsed, "bytes": len(resp.content), "errors": sum("error" in i for i in items),
                "regions": region_counts(regions)}


def served_round(caller: Caller, path: str, urls: list[str], concurrency: int) -> dict:
    """Both traffic shapes once for one path."""
    xml = LABEL_CONFIGS[path]
    n = caller.predict(urls, xml)
    point = {"predict_n": {"images": len(urls), "seconds": n["seconds"], "answer_bytes": n["bytes"],
                           "error_items": n["errors"], "regions": n["regions"]}}
    sessions = [requests.Session() for _ in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        calls = list(pool.map(lambda i: caller.predict([urls[i]], xml, sessions[i % concurrency]), range(len(urls))))
    elapsed = time.perf_counter() - start
    regions: dict = {}
    for c in calls:
        regions = add_counts(regions, c["regions"])
    point["one_task_calls"] = {"images": len(urls), "seconds": elapsed, "c": concurrency,
                               **percentiles([c["seconds"] for c in calls]),
                               "answer_bytes": sum(c["bytes"] for c in calls),
                               "error_items": sum(c["errors"] for c in calls), "regions": regions}
    return point


def measure_served(svc: Service, urls: list[str], concurrency: int, reps: int) -> dict:
    caller = Caller(svc)
    for path in PATHS:  # warm-up
        caller.predict(urls[:2], LABEL_CONFIGS[path])
    rounds = []
    for rep in range(reps):
        for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):  # ABBA
            point = served_round(caller, path, urls, concurrency)
            rounds.append({"path": path, **point})
            print(f"    {path:<4}: N={len(urls)} {len(urls) / point['predict_n']['seconds']:.2f} img/s, "
                  f"C={concurrency} {len(urls) / point['one_task_calls']['seconds']:.2f} img/s", flush=True)
    pooled = {}
    for shape in SHAPES:
        pooled[shape] = {}
        for path in PATHS:
            points = [r[shape] for r in rounds if r["path"] == path]
            pooled[shape][path] = {**pool_rates(points),
                                   "answer_bytes_per_round": points[0]["answer_bytes"],
                                   "error_items": sum(p["error_items"] for p in points),
                                   "regions_per_round": points[0]["regions"],
                                   "regions_same_every_round": all(p["regions"] == points[0]["regions"]
                                                                   for p in points)}
    return {"rounds": rounds, "pooled": pooled}


# ---------------------------------------------------------------- results
def table(results: dict) -> list[str]:
    raw, served = results["raw_floor"]["pooled"], results["served"]["pooled"]
    lines = [f"== {results['images']} scenes {WIDTH}x{HEIGHT}, {results['raw_floor']['before']['threads']} threads; "
             f"served / raw floor (eager) =="]
    lines.append(f"{'path':<5} {'raw img/s':>9} {'regions ms':>10} {'N img/s':>8} {'N ratio':>7} "
                 f"{'C img/s':>8} {'C ratio':>7} {'regions (raw/N/C)':>22} {'N answer B':>10}")
    for path in PATHS:
        r = raw[path]
        n, c = served["predict_n"][path], served["one_task_calls"][path]
        counts = (f"{r['regions_first_pass']['total']}/{n['regions_per_round']['total']}/"
                  f"{c['regions_per_round']['total']}")
        lines.append(f"{path:<5} {r['images_per_s']:>9.2f} {r['regions_ms_per_image']:>10.2f} "
                     f"{n['images_per_s']:>8.2f} {n['images_per_s'] / r['images_per_s']:>7.3f} "
                     f"{c['images_per_s']:>8.2f} {c['images_per_s'] / r['images_per_s']:>7.3f} {counts:>22} "
                     f"{n['answer_bytes_per_round']:>10}")
    for shape, s in results["summary"]["shapes"].items():
        lines.append(f"{shape}: mask ratio - box ratio = {s['ratio_gap']:+.3f} "
                     f"({'within' if s['within_0_05'] else 'NOT within'} {MAX_RATIO_GAP})")
    t = results["mask_traffic"]["totals"]
    if t["full_bool_bytes"]:
        lines.append(f"masks shipped by the Detector: {t['crop_bytes_per_image_mean'] / 1024:.1f} KiB/image "
                     f"({t['instances_per_image_mean']:.1f} instances) vs full bool masks "
                     f"{t['full_bool_bytes'] / t['images'] / 1024:.0f} KiB/image: {t['crop_over_full_bool']:.4f}x "
                     f"({t['crop_over_full_bits']:.3f}x of full masks as bits)")
    drift = results["raw_floor"]["drift_after_over_before"]
    lines.append("raw floor after/before the service: " + ", ".join(f"{p} {v:.3f}" for p, v in drift.items()))
    if any(abs(v - 1) > DRIFT_WARN for v in drift.values()):
        lines.append(f"WARNING: the raw floor moved by more than {DRIFT_WARN:.0%} during the run: the machine's "
                     "speed changed (other work?); the ratios are not to be trusted")
    load = results["load_average_1min_at_start"]
    if load > BUSY_LOAD:
        lines.append(f"WARNING: 1-min load average {load:.2f} at the start: other work shares the cores (with torch "
                     "threads = cores, a busy core can slow the model many times over)")
    if not results["summary"]["answers_nonempty"]:
        lines.append("WARNING: the mask path returned no polygon or brush region: the model found nothing")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--image-files", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(TOY_INS_CONFIG), help="model config (default: the toy RTMDet-Ins)")
    p.add_argument("--checkpoint", default=str(TOY_INS_CHECKPOINT), help="checkpoint (default: the toy's)")
    p.add_argument("--images", type=int, default=48, help="scenes (= tasks in the one-/predict shape)")
    p.add_argument("--concurrency", type=int, default=4, help="one-task calls in flight")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="raw floor torch threads (default: this machine's cores, as the shipped Detector)")
    p.add_argument("--floor-passes", dest="passes", type=int, default=2,
                   help="passes over the scenes per path, per raw floor measurement (before and after the service)")
    p.add_argument("--served-reps", type=int, default=2, help="served rounds per path (ABBA order)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    if opts.raw_floor:
        return raw_floor_main(opts)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"masks-{stamp()}.json"
    tmp = Path(tempfile.mkdtemp(prefix="mask-bench-"))
    config = {k: v for k, v in vars(opts).items() if k not in ("raw_floor", "image_files")}
    env = {"CONFIG_FILE": opts.config, "CHECKPOINT_FILE": opts.checkpoint, "MODEL_ACCELERATION": "eager"}
    results = {"provenance": provenance({**config, "serve_config": "serve_config.yaml", "environment": env,
                                         "seeds": [SEED0, SEED0 + opts.images - 1], "size": [WIDTH, HEIGHT]}),
               "serve_config_yaml": (ROOT / "serve_config.yaml").read_text(), "label_configs": LABEL_CONFIGS,
               "images": opts.images}
    load_start = os.getloadavg()[0]
    try:
        names = make_scenes(tmp / "images", opts.images)
        files = [str(tmp / "images" / n) for n in names]
        print("raw floor (before the service) ...", flush=True)
        before = measure_floor(opts.config, opts.checkpoint, files, opts.threads, opts.passes)
        print("    " + ", ".join(f"{k} {v['images_per_s']:.2f} img/s" for k, v in before["paths"].items()), flush=True)
        print("service ...", flush=True)
        with ImageServer(tmp / "images") as images, \
                Service(tmp, env, {"allowed_hosts": ["127.0.0.1"]}) as svc:
            results["service_ready"] = svc.ready_line()
            results["service_idle_rss_mib"] = svc.rss_mib()
            results["served"] = measure_served(svc, [f"{images.url}/{n}" for n in names], opts.concurrency,
                                               opts.served_reps)
        print("raw floor (after the service) ...", flush=True)
        after = measure_floor(opts.config, opts.checkpoint, files, opts.threads, opts.passes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results["load_average_1min_at_start"] = load_start  # before this run's own work (the end would count it)
    pooled = {}  # before and after the service as one measurement
    for p_ in PATHS:
        b, a = before["paths"][p_], after["paths"][p_]
        pooled[p_] = {**pool_rates([b, a]),
                      **{k: (b[k] + a[k]) / 2 for k in ("model_ms_per_image", "regions_ms_per_image")},
                      "regions_first_pass": b["regions_first_pass"],
                      "regions_json_bytes_first_pass": b["regions_json_bytes_first_pass"]}
    traffic = before.pop("mask_traffic")
    after.pop("mask_traffic")
    results["raw_floor"] = {"before": before, "after": after, "pooled": pooled,
                            "drift_after_over_before": {p_: after["paths"][p_]["images_per_s"]
                                                        / before["paths"][p_]["images_per_s"] for p_ in PATHS}}
    results["mask_traffic"] = {"per_image": traffic, "totals": traffic_totals(traffic)}
    served = results["served"]["pooled"]
    shapes = ratio_summary({p_: pooled[p_]["images_per_s"] for p_ in PATHS},
                           {shape: {p_: served[shape][p_]["images_per_s"] for p_ in PATHS} for shape in SHAPES})
    mask_regions = served["predict_n"]["mask"]["regions_per_round"]
    nonempty = bool(mask_regions.get("polygonlabels")) and bool(mask_regions.get("brushlabels"))
    regions_match = all(served[shape][p_]["regions_per_round"] == pooled[p_]["regions_first_pass"]
                        for shape in SHAPES for p_ in PATHS)
    errors = sum(served[shape][p_]["error_items"] for shape in SHAPES for p_ in PATHS)
    results["summary"] = {
        "shapes": shapes,
        "all_within_0_05": all(s["within_0_05"] for s in shapes.values()) and nonempty and errors == 0,
        "answers_nonempty": nonempty,
        "served_regions_match_raw": regions_match,
        "error_items": errors,
        "regions_ms_per_image": {p_: round(pooled[p_]["regions_ms_per_image"], 3) for p_ in PATHS},
        "raw_images_per_s": {p_: round(pooled[p_]["images_per_s"], 3) for p_ in PATHS},
        "crop_over_full_bool_masks": results["mask_traffic"]["totals"]["crop_over_full_bool"],
    }
    results["table"] = table(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(results["table"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
