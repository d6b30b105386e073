#!/usr/bin/env python
"""The shipped service against the raw model floor, in one run.

    .venv/bin/python -m bench.serving_bench                          # CPU: RTMDet-tiny + Faster R-CNN + no-op
    .venv/bin/python -m bench.serving_bench --models rtmdet-tiny --quick
    .venv/bin/python -m bench.serving_bench --models none            # the graph's ceiling (no-op model) only

(from the repository root, like every bench script). `serve_config.gpu.yaml`
on a GPU box: bench/gpu_check.sh.

In one run, on the same 640x480 JPEGs, it measures:
1. the raw floor: decode + model in one process, eager, with as many torch
   threads as the served Detector runs (the machine's cores), one image at a
   time; and the same with the acceleration the Detector picks;
2. `serve run` on the shipped serve_config.yaml (only host/port and
   allowed_hosts changed; the model comes from CONFIG_FILE/CHECKPOINT_FILE,
   images from IMAGE_DIR, as the README sets them), once it is ready and the
   machine has settled (Ray's start-up work done: at most 0.3 busy cores over
   5 s, waited for at most 120 s, recorded as "settled"), for the Detector's
   acceleration "eager" and "auto": one /predict with N tasks (Label Studio's
   "Retrieve predictions") and one-task calls C at a time (annotators
   opening tasks), with images from an HTTP server (0 ms and 100 ms added
   latency) and from image_dir; /health latency while the model is busy;
   the service's memory (RSS summed over its processes) idle and under load;
3. the graph's ceiling: the no-op model (bench/noop_app.py) on one /predict
   of 256 uploads and on one-task calls 16 at a time, against one process
   decoding the same files on one core.
Results: bench/results/serving-<stamp>.json (+ .png) with provenance.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from bench.provenance import provenance, stamp
from tests.image_server import ImageServer
from tests.model_fixtures import FASTER_RCNN, RTMDET_TINY, TOY_CONFIG, save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"rtmdet-tiny": RTMDET_TINY, "faster-rcnn": FASTER_RCNN, "toy": str(TOY_CONFIG)}
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="Car" predicted_values="car,truck"/><Label value="Person" predicted_values="person"/>'
    '<Label value="Airplane" predicted_values="airplane"/></RectangleLabels></View>'
)
UPLOAD_SUBDIR = "1"  # tasks say /data/upload/1/<name>, as Label Studio's uploads do
LONE_CALLS = 5  # sequential one-task calls per source: their median is a lone image's latency


# ----------------------------------------------------------------- images
def make_images(directory: Path, count: int = 8) -> list[str]:
    """640x480 JPEGs: matplotlib's sample photo where it ships, synthetic scenes."""
    from PIL import Image

    from tests.toy_detector.scenes import make_scene

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    photo = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        names.append("photo.jpg")
        Image.open(photo).convert("RGB").resize((640, 480)).save(directory / names[-1], quality=90)
    for i in range(count - len(names)):
        names.append(f"scene{i}.jpg")
        make_scene(9000 + i, 640, 480)[0].save(directory / names[-1], quality=90)
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

    blobs = [Path(p).read_bytes() for p in opts.images]
    det = BatchDetector(resolve_config_file(opts.config), opts.checkpoint, opts.device,
                        acceleration=opts.acceleration)
    det.detect([decode_image(blobs[0]).bgr], stacked=False)  # warm-up
    start = time.perf_counter()
    for i in range(opts.count):
        det.detect([decode_image(blobs[i % len(blobs)]).bgr], stacked=False)
    seconds = time.perf_counter() - start
    out = {"images_per_s": opts.count / seconds, "images": opts.count, "threads": opts.threads,
           "acceleration": det.acceleration_report}
    print("RAW_FLOOR " + json.dumps(out), flush=True)


def measure_raw_floor(config: str, checkpoint: str, images: list[str], threads: int, count: int,
                      acceleration: str) -> dict:
    cmd = [sys.executable, "-m", "bench.serving_bench", "--raw-floor", "--config", config, "--checkpoint", checkpoint,
           "--threads", str(threads), "--count", str(count), "--acceleration", acceleration, "--images", *images]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((text for text in out.stdout.splitlines() if text.startswith("RAW_FLOOR ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RAW_FLOOR "):])


def bracket_floor(floor: dict, run: dict, config: str, checkpoint: str, images: list[str], threads: int,
                  count: int) -> None:
    """The eager floor again after a service: the machine's speed drifts over
    minutes, so each service is compared with the mean of the floors measured
    just before and just after it (floor_for)."""
    before = floor.get("eager_after", floor["eager"])
    floor["eager_after"] = measure_raw_floor(config, checkpoint, images, threads, count, "eager")
    run["floor_bracket"] = {"before": before["images_per_s"], "after": floor["eager_after"]["images_per_s"]}


def decode_rate_one_core(paths: list[str], count: int = 600) -> float:
    """One process, pinned to one core, decoding the files: images/s."""
    code = (
        "import os, sys, time, cv2; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); cv2.setNumThreads(1)\n"
        "from mmdet_ls.images import decode_image\n"
        "blobs = [open(p, 'rb').read() for p in sys.argv[2:]]; n = int(sys.argv[1])\n"
        "[decode_image(b) for b in blobs]\n"
        "t = time.perf_counter()\n"
        "for i in range(n): decode_image(blobs[i % len(blobs)])\n"
        "print(n / (time.perf_counter() - t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(count), *paths], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- service
class Service:
    """`serve run` on a copy of the shipped config, the way the README starts
    it: only host/port (and `args_update`, e.g. allowed_hosts) changed;
    everything else from the environment `env`."""

    def __init__(self, tmp: Path, env: dict, args_update: dict | None = None, noop: bool = False,
                 shipped: str = "serve_config.yaml", detector_layout: tuple[int, float] | None = None):
        from tests.serve_fixtures import free_port

        base = yaml.safe_load((ROOT / shipped).read_text())
        self.port = free_port()
        base["http_options"]["host"], base["http_options"]["port"] = "127.0.0.1", self.port
        app = base["applications"][0]
        app.setdefault("args", {}).update(args_update or {})
        if noop:
            app["import_path"] = "bench.noop_app:build_app"
        if detector_layout is not None:  # the thread-rule comparison only: (replicas, CPUs each)
            for dep in app["deployments"]:
                if dep["name"] == "Detector":
                    dep["num_replicas"], dep["ray_actor_options"] = detector_layout[0], {"num_cpus": detector_layout[1]}
        self.config = tmp / f"serve_config.bench.{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(base, sort_keys=False))
        self.config_text = self.config.read_text()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.proc = None
        self.errors = 0  # error items in /predict answers so far
        self.settled = None  # how long the machine took to quieten after ready

    def __enter__(self):
        env = {**os.environ, **getattr(self, "env", {}), "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
        serve_bin = str(Path(sys.executable).parent / "serve")
        self.log = open(str(self.config) + ".log", "w")
        self.proc = subprocess.Popen([serve_bin, "run", str(self.config)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=1).json().get("ready"):
                    self.settle()
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

    def predict(self, urls: list[str], session=None) -> float:
        tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]
        start = time.perf_counter()
        body = {"tasks": tasks, "project": "1.1", "label_config": LABEL_CONFIG}
        resp = (session or requests).post(f"{self.url}/predict", json=body, timeout=300)
        elapsed = time.perf_counter() - start
        items = resp.json()["results"] if resp.status_code == 200 else []
        if len(items) != len(urls):
            raise RuntimeError(f"bad answer: {resp.status_code} {resp.text[:300]}")
        # Error items (e.g. "deadline") are counted, not fatal: a point that ran
        # out of time is recorded as such.
        self.errors += sum("error" in i for i in items)
        return elapsed

    def settle(self, idle_cores: float = 0.3, window_s: float = 5.0, max_s: float = 120.0) -> None:
        """Wait until the machine is quiet: for some 30 s after a start Ray's
        own start-up work (agents, controller, proxies) shares the cores, which
        a service running for hours never sees. Records how long it took and
        the last window's busy cores."""
        def busy_ticks():
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
            return sum(fields) - fields[3] - fields[4], sum(fields)  # busy (not idle/iowait), all

        start = time.monotonic()
        while True:
            b0, t0 = busy_ticks()
            time.sleep(window_s)
            b1, t1 = busy_ticks()
            cores = len(os.sched_getaffinity(0)) * (b1 - b0) / max(1, t1 - t0)
            if cores <= idle_cores or time.monotonic() - start >= max_s:
                self.settled = {"seconds": round(time.monotonic() - start, 1), "busy_cores": round(cores, 3)}
                return

    def ready_line(self) -> str | None:
        self.log.flush()
        lines = [line for line in Path(self.log.name).read_text(errors="replace").splitlines()
                 if "Detector ready" in line]
        return lines[-1].split(" -- ", 1)[-1] if lines else None

    def rss_mib(self) -> float:
        """RSS summed over the service's processes (shared pages count in each)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getsid(int(pid)) != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total / 2**20


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    return {"p50_ms": 1000 * pick(0.5), "p95_ms": 1000 * pick(0.95), "p99_ms": 1000 * pick(0.99)}


class Sampler:
    """While a measurement runs: /health latency and the service's RSS."""

    def __init__(self, svc: Service, interval_s: float = 0.5):
        self.svc, self.interval_s = svc, interval_s
        self.health_s, self.rss = [], []
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            start = time.perf_counter()
            try:
                requests.get(f"{self.svc.url}/health", timeout=5)
                self.health_s.append(time.perf_counter() - start)
            except requests.RequestException:
                self.health_s.append(float("inf"))
            self.rss.append(self.svc.rss_mib())

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def shapes(svc: Service, sources: dict[str, list[str]], n_tasks: int, calls_n: int, concurrency: int) -> dict:
    """Both Label Studio traffic shapes, per image source."""
    out = {}
    svc.predict(next(iter(sources.values()))[:2])  # warm-up
    for source, urls in sources.items():
        batch = [urls[i % len(urls)] for i in range(n_tasks)]
        errors_before = svc.errors
        with Sampler(svc) as sampler:
            elapsed = svc.predict(batch)
        point = {"predict_n": {"n": n_tasks, "seconds": elapsed, "images_per_s": n_tasks / elapsed,
                               "health_max_ms": 1000 * max(sampler.health_s, default=0.0),
                               "rss_mib_max": max(sampler.rss, default=None),
                               "error_items": svc.errors - errors_before}}
        errors_before = svc.errors
        sessions = [requests.Session() for _ in range(concurrency)]
        start = time.perf_counter()
        with Sampler(svc) as sampler, ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda i, u=urls, s=sessions: svc.predict([u[i % len(u)]], s[i % concurrency]),
                                      range(calls_n)))
        elapsed = time.perf_counter() - start
        point["one_task_calls"] = {"c": concurrency, "calls": calls_n, "images_per_s": calls_n / elapsed,
                                   **percentiles(latencies), "health_max_ms": 1000 * max(sampler.health_s, default=0.0),
                                   "rss_mib_max": max(sampler.rss, default=None),
                                   "error_items": svc.errors - errors_before}
        # One annotator opening tasks one after another: a lone image's latency.
        point["lone_task_s"] = sorted(svc.predict([urls[i % len(urls)]]) for i in range(LONE_CALLS))[LONE_CALLS // 2]
        out[source] = point
        print(f"    {source}: N={n_tasks} {point['predict_n']['images_per_s']:.3f} img/s, "
              f"C={concurrency} {point['one_task_calls']['images_per_s']:.3f} img/s", flush=True)
    return out


def noop_ceiling(tmp: Path, upload_dir: Path, names: list[str], quick: bool) -> dict:
    (tmp / "noop.pth").write_bytes(b"never loaded")
    env = {"CONFIG_FILE": RTMDET_TINY, "CHECKPOINT_FILE": str(tmp / "noop.pth"), "IMAGE_DIR": str(upload_dir)}
    uploads = [f"/data/upload/{UPLOAD_SUBDIR}/{n}" for n in names]
    paths = [str(upload_dir / UPLOAD_SUBDIR / n) for n in names]
    n_predict, calls = 256, (200 if quick else 600)
    with Service(tmp, env, noop=True) as svc:
        idle_rss = svc.rss_mib()
        svc.predict(uploads * 4)
        predict_s = []
        for _ in range(3):
            predict_s.append(svc.predict([uploads[i % len(uploads)] for i in range(n_predict)]))
        sessions = [requests.Session() for _ in range(16)]
        list(ThreadPoolExecutor(16).map(lambda i: svc.predict([uploads[i % len(uploads)]], sessions[i % 16]),
                                        range(64)))
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            latencies = list(pool.map(lambda i: svc.predict([uploads[i % len(uploads)]], sessions[i % 16]),
                                      range(calls)))
        c16 = calls / (time.perf_counter() - start)
    decode = decode_rate_one_core(paths)
    best_predict = n_predict / min(predict_s)
    return {"decode_one_core_images_per_s": decode,
            "predict_256": {"images_per_s": best_predict, "runs_s": predict_s,
                            "ratio_to_decode": best_predict / decode},
            "one_task_c16": {"requests_per_s": c16, "calls": calls, **percentiles(latencies),
                             "ratio_to_decode": c16 / decode},
            "idle_rss_mib": idle_rss}


# ---------------------------------------------------------------- results
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        m = results["models"][name]
        labels, values = [], []
        for accel, run in m["served"].items():
            for source, point in run["shapes"].items():
                for shape, key in (("N", "predict_n"), ("C", "one_task_calls")):
                    labels.append(f"{accel}\n{source}\n{shape}")
                    values.append(point[key]["images_per_s"] / floor_for(m, run))
        ax.bar(range(len(values)), values)
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(0.95, color="r", lw=0.8, ls="--")
        ax.set_xticks(range(len(values)), labels, fontsize=6)
        ax.set_ylabel("served / eager raw floor")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def floor_for(m: dict, run: dict) -> float:
    """A service's eager raw floor: the mean of the floors measured just before
    and just after it (older result files: the one floor measured first)."""
    bracket = run.get("floor_bracket")
    return (bracket["before"] + bracket["after"]) / 2 if bracket else m["raw_floor"]["eager"]["images_per_s"]


def summary(results: dict) -> list[str]:
    lines = [f"== {results['provenance']['machine']['cpus_usable']} cores; served / eager raw floor "
             "(mean of the floors just before and after each service) =="]
    for name, m in results["models"].items():
        floor = m["raw_floor"]["eager"]["images_per_s"]
        accel = m["raw_floor"]["auto"]["acceleration"]
        lines.append(f"{name}: raw floor eager {floor:.3f} img/s at the start"
                     + f", auto {m['raw_floor']['auto']['images_per_s']:.3f} ({accel['mode']}: {accel['reason']})")
        for accel, run in m["served"].items():
            floor = floor_for(m, run)
            if "floor_bracket" in run:
                lines.append(f"  {accel}: eager floor {run['floor_bracket']['before']:.3f} before, "
                             f"{run['floor_bracket']['after']:.3f} after")
            for source, point in run["shapes"].items():
                n, c = point["predict_n"], point["one_task_calls"]
                errors = n.get("error_items", 0) + c.get("error_items", 0)
                lines.append(f"  {accel:<6.27} {source:<10} N={n['n']}: {n['images_per_s'] / floor:.2f}x  "
                             f"C={c['c']}: {c['images_per_s'] / floor:.2f}x  (health max "
                             f"{max(n['health_max_ms'], c['health_max_ms']):.0f} ms"
                             + (f", lone task {point['lone_task_s']:.2f} s" if "lone_task_s" in point else "")
                             + (f", {errors} error items" if errors else "") + ")")
    ceiling = results.get("noop_ceiling")
    if ceiling:
        lines.append(f"no-op ceiling: decode {ceiling['decode_one_core_images_per_s']:.0f} img/s on one core; "
                     f"/predict of 256 {ceiling['predict_256']['images_per_s']:.0f} img/s "
                     f"({ceiling['predict_256']['ratio_to_decode']:.2f}x); one-task C=16 "
                     f"{ceiling['one_task_c16']['requests_per_s']:.0f} req/s "
                     f"({ceiling['one_task_c16']['ratio_to_decode']:.2f}x)")
    return lines


def save(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config"), p.add_argument("--checkpoint"), p.add_argument("--images", nargs="*")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--acceleration", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--models", default="rtmdet-tiny,faster-rcnn", help="comma list, or none (no-op ceiling only)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="raw floor torch threads (default: this machine's cores, as the shipped Detector)")
    p.add_argument("--tasks", type=int, default=24, help="tasks in the one-/predict shape (Label Studio: 24-32)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="fewer images, for a smoke run")
    p.add_argument("--no-noop", action="store_true", help="skip the no-op ceiling")
    p.add_argument("--thread-rule", action="store_true",
                   help="also serve eager with one Detector replica on every core (the replica rule's evidence)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    if opts.raw_floor:
        return raw_floor_main(opts)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{stamp()}-cpu.json"
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    config = {k: v for k, v in vars(opts).items() if k not in ("raw_floor", "config", "checkpoint", "images")}
    results = {"provenance": provenance({**config, "serve_config": "serve_config.yaml"}),
               "serve_config_yaml": (ROOT / "serve_config.yaml").read_text(), "models": {}}
    try:
        upload_dir = tmp / "uploads"
        names = make_images(upload_dir / UPLOAD_SUBDIR)
        paths = [str(upload_dir / UPLOAD_SUBDIR / n) for n in names]
        with ImageServer(upload_dir / UPLOAD_SUBDIR) as fast, \
                ImageServer(upload_dir / UPLOAD_SUBDIR, latency_s=0.1) as slow:
            sources = {"http_0ms": [f"{fast.url}/{n}" for n in names],
                       "http_100ms": [f"{slow.url}/{n}" for n in names],
                       "image_dir": [f"/data/upload/{UPLOAD_SUBDIR}/{n}" for n in names]}
            for name in [m for m in opts.models.split(",") if m and m != "none"]:
                model = MODELS[name]
                checkpoint = str(save_random_checkpoint(model, tmp / f"{name}.pth"))
                count = 8 if opts.quick else opts.tasks
                print(f"[{name}] raw floor ...", flush=True)
                floor = {mode: measure_raw_floor(model, checkpoint, paths, opts.threads, count, mode)
                         for mode in ("eager", "auto")}
                served = {}
                results["models"][name] = {"config": model, "raw_floor": floor, "served": served}
                remeasure = (model, checkpoint, paths, opts.threads, count)

                env = {"CONFIG_FILE": model, "CHECKPOINT_FILE": checkpoint, "IMAGE_DIR": str(upload_dir)}
                args = {"allowed_hosts": ["127.0.0.1"]}
                n_tasks = 8 if opts.quick else opts.tasks
                for accel in ("eager", "auto"):
                    print(f"[{name}] served, acceleration {accel} ...", flush=True)
                    with Service(tmp, env, {**args, "model_acceleration": accel}) as svc:
                        served[accel] = {"ready": svc.ready_line(), "idle_rss_mib": svc.rss_mib(),
                                         "settled": svc.settled,
                                         "shapes": shapes(svc, sources, n_tasks, n_tasks, opts.concurrency)}
                    bracket_floor(floor, served[accel], *remeasure)
                    save(results, path)  # a later failure keeps what was measured
                if opts.thread_rule and opts.threads > 1:
                    # Rule check: the shipped default (two replicas sharing the cores) vs one
                    # replica on every core (the previous default), eager, every source.
                    print(f"[{name}] served eager, one Detector replica on all {opts.threads} cores ...", flush=True)
                    with Service(tmp, env, {**args, "model_acceleration": "eager"},
                                 detector_layout=(1, opts.threads)) as svc:
                        served["eager_one_replica_all_cores"] = {
                            "ready": svc.ready_line(), "idle_rss_mib": svc.rss_mib(), "settled": svc.settled,
                            "shapes": shapes(svc, sources, n_tasks, n_tasks, opts.concurrency)}
                    bracket_floor(floor, served["eager_one_replica_all_cores"], *remeasure)
                    save(results, path)
            if not opts.no_noop:
                print("[noop] graph ceiling ...", flush=True)
                results["noop_ceiling"] = noop_ceiling(tmp, upload_dir, names, opts.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results["summary"] = summary(results)
    save(results, path)
    plot(results, path.with_suffix(".png"))
    print("\n".join(results["summary"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
