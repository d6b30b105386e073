#!/usr/bin/env python
"""Serving efficiency against the raw model, on both Label Studio traffic shapes.

    .venv/bin/python -m bench.serving_bench                 # CPU: RTMDet-tiny + Faster R-CNN
    .venv/bin/python -m bench.serving_bench --models rtmdet-tiny --quick
    .venv/bin/python -m bench.serving_bench --device cuda   # same sweep on a GPU, < 8 min

(from the repository root, like every bench script).

In one run and on the same images it measures: (1) the raw floor, decode +
model in one process at the best batch size; (2) one /predict carrying N
tasks (Label Studio's "Retrieve predictions"); (3) one-task requests at
concurrency C (annotators opening tasks); (4) pure serving overhead with the
model call replaced by a no-op. Images come from a local HTTP server with 0 ms
and 100 ms added latency. Results: bench/results/*.json, a PNG plot, a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from tests.image_server import ImageServer
from tests.model_fixtures import FASTER_RCNN, RTMDET_TINY, TOY_CHECKPOINT, TOY_CONFIG, save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"rtmdet-tiny": RTMDET_TINY, "faster-rcnn": FASTER_RCNN, "toy": str(TOY_CONFIG)}
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="Car" predicted_values="car,truck"/><Label value="Person" predicted_values="person"/>'
    '<Label value="Airplane" predicted_values="airplane"/></RectangleLabels></View>'
)


# ----------------------------------------------------------------- images
def make_images(directory: Path) -> list[str]:
    """Real photos where a package ships some (matplotlib's sample photo),
    synthetic scenes otherwise; several sizes."""
    from PIL import Image

    from tests.toy_detector.scenes import make_scene

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    photo = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        img = Image.open(photo).convert("RGB")
        for i, size in enumerate([(512, 600), (1024, 1200), (640, 480), (1280, 720)]):
            names.append(f"photo{i}.jpg")
            img.resize(size).save(directory / names[-1], quality=90)
    for i, size in enumerate([(320, 256), (416, 416), (800, 600), (1920, 1080)]):
        names.append(f"scene{i}.jpg")
        make_scene(9000 + i, *size)[0].save(directory / names[-1], quality=90)
    Image.new("RGB", (64, 48), (120, 130, 140)).save(directory / "tiny.png")
    return names


# -------------------------------------------------------------- raw floor
def raw_floor_main(opts) -> None:
    """Subprocess mode: decode + model in this one process, print JSON."""
    import torch

    torch.set_num_threads(opts.threads)
    import cv2

    cv2.setNumThreads(opts.threads)
    from mmdet_ls.images import decode_image
    from mmdet_ls.inference import BatchDetector
    from mmdet_ls.model_files import resolve_config_file

    det = BatchDetector(resolve_config_file(opts.config), opts.checkpoint, opts.device)
    blobs = [Path(p).read_bytes() for p in opts.images]
    det.detect([decode_image(blobs[0]).bgr])  # warm-up
    results = []
    for batch in [int(b) for b in opts.batch_sizes.split(",")]:
        for stacked in ([False, True] if batch > 1 else [True]):
            n = max(len(blobs), batch)
            start = time.perf_counter()
            for i in range(0, n, batch):
                chunk = [blobs[j % len(blobs)] for j in range(i, min(n, i + batch))]
                det.detect([decode_image(b).bgr for b in chunk], stacked=stacked)
            if opts.device.startswith("cuda"):
                torch.cuda.synchronize()
            results.append({"batch": batch, "stacked": stacked, "images_per_s": n / (time.perf_counter() - start)})
    print("RAW_FLOOR " + json.dumps(results), flush=True)


def measure_raw_floor(config, checkpoint, images, device, threads, batch_sizes) -> dict:
    cmd = [sys.executable, "-m", "bench.serving_bench", "--raw-floor", "--config", config, "--checkpoint", checkpoint,
           "--device", device, "--threads", str(threads), "--batch-sizes", batch_sizes, "--images", *images]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((text for text in out.stdout.splitlines() if text.startswith("RAW_FLOOR ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    rows = json.loads(line[len("RAW_FLOOR "):])
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"rows": rows, "best": best}


# ---------------------------------------------------------------- service
class Service:
    """`serve run` on a generated config, the way users start it."""

    def __init__(self, tmp: Path, args: dict, device: str, threads: int, max_batch: int, noop: bool = False):
        shipped = "serve_config.gpu.yaml" if device.startswith("cuda") else "serve_config.yaml"
        base = yaml.safe_load((ROOT / shipped).read_text())
        from tests.serve_fixtures import free_port

        self.port = free_port()
        base["http_options"]["port"] = self.port
        base["http_options"]["host"] = "127.0.0.1"
        app = base["applications"][0]
        app["args"].update(args)
        if noop:
            app["import_path"] = "bench.noop_app:build_app"
        for dep in app["deployments"]:
            if dep["name"] == "Detector":
                dep["ray_actor_options"]["num_cpus"] = threads
                dep.setdefault("user_config", {})["max_batch_size"] = max_batch
                dep["max_ongoing_requests"] = max(dep.get("max_ongoing_requests", 16), 2 * max_batch)
            elif not device.startswith("cuda"):
                # Logical only: lets the detector own every core, as the raw floor does.
                dep["ray_actor_options"]["num_cpus"] = 0
        self.config = tmp / f"serve_config.bench.{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(base, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self):
        env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
        serve_bin = str(Path(sys.executable).parent / "serve")
        self.log = open(str(self.config) + ".log", "w")
        self.proc = subprocess.Popen([serve_bin, "run", str(self.config)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=1).json().get("ready"):
                    return self
            except (requests.RequestException, ValueError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"service did not become ready; see {self.log.name}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def predict(self, urls: list[str]) -> float:
        tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]
        start = time.perf_counter()
        body = {"tasks": tasks, "project": "1.1", "label_config": LABEL_CONFIG}
        resp = requests.post(f"{self.url}/predict", json=body,
                             timeout=300)
        elapsed = time.perf_counter() - start
        items = resp.json()["results"]
        errors = [i for i in items if "error" in i]
        if resp.status_code != 200 or len(items) != len(urls) or errors:
            raise RuntimeError(f"bad answer: {resp.status_code} {errors[:2]}")
        return elapsed

    def batch_stats(self) -> tuple[float, float]:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        total = lambda name: sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))  # noqa
        return total("ray_mmdet_ls_model_batch_size_sum"), total("ray_mmdet_ls_model_batch_size_count")


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    return {"p50_ms": 1000 * pick(0.5), "p95_ms": 1000 * pick(0.95), "p99_ms": 1000 * pick(0.99)}


def mean_batch(svc: Service, before: tuple[float, float]) -> float | None:
    time.sleep(3)  # Ray exports metrics every few seconds
    s, c = svc.batch_stats()
    return (s - before[0]) / (c - before[1]) if c > before[1] else None


def sweep(svc: Service, urls: list[str], shapes: list[int], concurrencies: list[int], sec_per_image: float,
          budget_s: float) -> dict:
    out = {"predict_n": [], "concurrency": []}
    svc.predict(urls[:2])  # warm-up
    for n in shapes:
        if n * sec_per_image > budget_s:
            out["predict_n"].append({"n": n, "skipped": f"over the {budget_s:.0f} s budget"})
            continue
        before = svc.batch_stats()
        elapsed = svc.predict([urls[i % len(urls)] for i in range(n)])
        out["predict_n"].append({"n": n, "seconds": elapsed, "images_per_s": n / elapsed,
                                 "mean_batch": mean_batch(svc, before)})
    for c in concurrencies:
        total = max(2 * c, min(64, int(budget_s / max(sec_per_image, 1e-3))))
        if total * sec_per_image > 2 * budget_s:
            out["concurrency"].append({"c": c, "skipped": "over budget"})
            continue
        before = svc.batch_stats()
        latencies = []
        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            latencies = list(pool.map(lambda i: svc.predict([urls[i % len(urls)]]), range(total)))
        elapsed = time.perf_counter() - start
        out["concurrency"].append({"c": c, "requests": total, "images_per_s": total / elapsed,
                                   **percentiles(latencies), "mean_batch": mean_batch(svc, before)})
    return out


def noop_overhead(tmp: Path, image_dir: Path, server: ImageServer, device: str, requests_n: int) -> dict:
    args = {"config_file": RTMDET_TINY, "checkpoint_file": str(tmp / "noop.pth"), "image_dir": str(image_dir),
            "allowed_hosts": ["127.0.0.1"]}
    (tmp / "noop.pth").write_bytes(b"not loaded")
    with Service(tmp, args, device, 1, 4, noop=True) as svc:
        url = f"{server.url}/tiny.png"
        for _ in range(10):
            svc.predict([url])
        latencies = [svc.predict([url]) for _ in range(requests_n)]
    return percentiles(latencies)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        m = results["models"][name]
        floor = m["raw_floor"]["best"]["images_per_s"]
        for col, (key, xkey, label) in enumerate([("predict_n", "n", "tasks per /predict (N)"),
                                                  ("concurrency", "c", "concurrent one-task requests")]):
            ax = axes[row][col]
            for latency, style in (("0ms", "o-"), ("100ms", "s--")):
                pts = [p for p in m["served"].get(latency, {}).get(key, []) if "images_per_s" in p]
                if pts:
                    ax.plot([p[xkey] for p in pts], [p["images_per_s"] for p in pts], style, label=f"served, {latency}")
            ax.axhline(floor, color="k", lw=1, label="raw floor")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel("images/s")
            ax.set_title(f"{name} ({results['device']})")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config"), p.add_argument("--checkpoint"), p.add_argument("--images", nargs="*")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--models", default="rtmdet-tiny,faster-rcnn", help="comma list, or none (no-op overhead only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="fewer points, for a smoke run")
    p.add_argument("--budget-s", type=float, default=90.0, help="max seconds per measurement point")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    if opts.raw_floor:
        return raw_floor_main(opts)

    gpu = opts.device.startswith("cuda")
    shapes = [1, 8, 32] if opts.quick else [1, 8, 32, 128]
    concurrencies = [1, 4, 8] if opts.quick else [1, 2, 4, 8, 16]
    batch_sizes = "1,4,8,16,32" if gpu else "1,2,4"
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    results = {"device": opts.device, "threads": opts.threads, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "models": {}}
    try:
        image_dir = tmp / "images"
        names = make_images(image_dir)
        paths = [str(image_dir / n) for n in names]
        with ImageServer(image_dir) as fast, ImageServer(image_dir, latency_s=0.1) as slow:
            for name in [m for m in opts.models.split(",") if m and m != "none"]:
                config = MODELS[name]
                if name == "toy":
                    checkpoint = str(TOY_CHECKPOINT)
                else:
                    checkpoint = str(save_random_checkpoint(config, tmp / f"{name}.pth"))
                print(f"[{name}] raw floor ...", flush=True)
                floor = measure_raw_floor(config, checkpoint, paths, opts.device, opts.threads, batch_sizes)
                sec_per_image = 1.0 / floor["best"]["images_per_s"]
                max_batch = floor["best"]["batch"] if gpu else 4
                args = {"config_file": config, "checkpoint_file": checkpoint, "device": opts.device,
                        "image_dir": str(tmp / "uploads"), "allowed_hosts": ["127.0.0.1"],
                        "torch_threads": opts.threads}
                served = {}
                with Service(tmp, args, opts.device, opts.threads, max(max_batch, 4)) as svc:
                    for latency, server in (("0ms", fast), ("100ms", slow)):
                        print(f"[{name}] served sweep, {latency} image latency ...", flush=True)
                        urls = [f"{server.url}/{n}" for n in names]
                        conc = concurrencies if latency == "0ms" else [c for c in concurrencies if c >= 4]
                        served[latency] = sweep(svc, urls, shapes if latency == "0ms" else shapes[1:], conc,
                                                sec_per_image, opts.budget_s)
                results["models"][name] = {"config": config, "raw_floor": floor, "served": served}
            print("[noop] serving overhead ...", flush=True)
            results["noop_overhead"] = noop_overhead(tmp, image_dir, fast, opts.device, 100 if opts.quick else 300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}-{opts.device}.json").write_text(json.dumps(results, indent=2))
    if results["models"]:
        plot(results, out / f"{stamp}-{opts.device}.png")
    print_table(results)
    print(f"\nwrote {out / f'{stamp}-{opts.device}.json'} and .png")


def print_table(results: dict) -> None:
    print(f"\n== serving efficiency, {results['device']}, {results['threads']} threads ==")
    print(f"{'model':<12} {'shape':<22} {'img/s':>8} {'served/raw':>10} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    for name, m in results["models"].items():
        floor = m["raw_floor"]["best"]
        label = f"raw floor (b={floor['batch']}{', stacked' if floor['stacked'] else ''})"
        print(f"{name:<12} {label:<22} "
              f"{floor['images_per_s']:8.2f} {1.0:10.2f}")
        zero = m["served"]["0ms"]
        for latency, res in m["served"].items():
            for point in res["predict_n"] + res["concurrency"]:
                if "images_per_s" not in point:
                    continue
                shape = f"N={point['n']}" if "n" in point else f"C={point['c']}"
                ratio = point["images_per_s"] / floor["images_per_s"]
                extra = ""
                if latency == "100ms":
                    same = next((q for q in zero["predict_n"] + zero["concurrency"]
                                 if q.get("n", q.get("c")) == point.get("n", point.get("c"))
                                 and ("n" in q) == ("n" in point) and "images_per_s" in q), None)
                    if same:
                        extra = f"  ({point['images_per_s'] / same['images_per_s']:.2f}x of 0 ms)"
                mb = point.get("mean_batch")
                print(f"{name:<12} {shape + ' ' + latency:<22} {point['images_per_s']:8.2f} {ratio:10.2f} "
                      f"{point.get('p50_ms', float('nan')):8.0f} {point.get('p99_ms', float('nan')):8.0f} "
                      f"{(mb or float('nan')):6.2f}{extra}")
    o = results.get("noop_overhead", {})
    if o:
        print(f"no-op model, one-task request: p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms")


if __name__ == "__main__":
    main()
