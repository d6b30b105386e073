#!/usr/bin/env python
"""Soak: saturating /predict load for N minutes, watching memory and lost tasks.

    .venv/bin/python -m bench.soak                    # 10 minutes, toy RTMDet, local Ray
    .venv/bin/python -m bench.soak --minutes 3        # writes bench/results/soak-<UTC time>.json

(from the repository root, like every bench script).

Starts its own local Ray (`ray.init(address="local")`, never touches other
clusters) and the real deployment graph, serves images from a local HTTP
server (good scenes plus a share of broken URLs: 404, HTML, noise, redirect
loops, slow), and keeps `--concurrency` clients busy with `--tasks-per-call`
tasks each. Every `--sample-s` seconds it reads the RSS of every Serve actor
(replicas, proxy, controller; process ids via the actors themselves, RSS
from psutil or /proc). At the end it prints, per replica, RSS after warm-up
vs. at the end (goal: flat within 5 %), and tasks sent vs. answered (goal:
equal; an answered task is a prediction or an explicit error item).

The result file (default bench/results/soak-<UTC time>.json, or --json)
records the summary with its provenance: git commit and uncommitted paths,
every argument, and the machine (CPUs, RAM, load average, Python and
package versions), as bench/provenance.py writes it.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.provenance import provenance, stamp
from tests.image_server import ImageServer
from tests.model_fixtures import TOY_CHECKPOINT, TOY_CONFIG

ROOT = Path(__file__).resolve().parent.parent
# Ray's worker processes (replicas) import serve_app, deployments and mmdet_ls from here.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

APP = "mmdet-backend"
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="Car" predicted_values="car,truck"/><Label value="Person" predicted_values="person"/>'
    '<Label value="Airplane" predicted_values="airplane"/></RectangleLabels></View>'
)


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def serve_actor_pids() -> dict[str, int]:
    """Every live actor in the "serve" namespace (replicas, proxy, controller) -> pid.

    ray.util.state.list_actors needs the dashboard; asking each actor for
    its own pid works on any local Ray."""
    import ray

    pids = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != "serve":
            continue
        name = entry["name"]
        try:
            actor = ray.get_actor(name, namespace="serve")
            pids[name] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except Exception:
            continue
    return pids


def short_name(actor_name: str) -> str:
    if actor_name.startswith("SERVE_REPLICA::"):
        return actor_name.split("::", 1)[1].split("#", 1)[1]  # Deployment#id
    return actor_name.split(":")[0][:40]


def make_images(directory: Path, count: int) -> list[str]:
    from tests.toy_detector.scenes import make_scene

    names = []
    for i in range(count):
        width, height = 320 + 16 * (i % 8), 240 + 12 * (i % 5)
        img = make_scene(4000 + i, width, height)[0]
        name = f"scene{i}.{'jpg' if i % 2 else 'png'}"
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 2 else "PNG")
        (directory / name).write_bytes(buf.getvalue())
        names.append(name)
    (directory / "noise.png").write_bytes(os.urandom(4096))
    return names


class Load:
    def __init__(self, url: str, good: list[str], bad: list[str], tasks_per_call: int, bad_fraction: float):
        self.url, self.good, self.bad = url, good, bad
        self.tasks_per_call, self.bad_fraction = tasks_per_call, bad_fraction
        self.lock = threading.Lock()
        self.sent = self.answered = self.predicted = self.calls = 0
        self.errors: collections.Counter = collections.Counter()  # error_reason -> count
        self.http_failures: collections.Counter = collections.Counter()  # calls not answered with 200
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.next_id = 0

    def _tasks(self, rng: random.Random) -> list[dict]:
        tasks = []
        with self.lock:
            first = self.next_id
            self.next_id += self.tasks_per_call
        for k in range(self.tasks_per_call):
            pool = self.bad if rng.random() < self.bad_fraction else self.good
            tasks.append({"id": first + k, "data": {"image": rng.choice(pool)}})
        return tasks

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        session.trust_env = False
        while not self.stop.is_set():
            tasks = self._tasks(rng)
            started = time.monotonic()
            try:
                resp = session.post(f"{self.url}/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG,
                                                                  "project": "1.1"}, timeout=110)
                status = resp.status_code
                results = resp.json().get("results", []) if status == 200 else []
            except (requests.RequestException, ValueError) as exc:
                status, results = type(exc).__name__, []
            elapsed = time.monotonic() - started
            with self.lock:
                self.calls += 1
                self.sent += len(tasks)
                self.latencies.append(elapsed)
                if status != 200:
                    self.http_failures[str(status)] += 1
                    continue
                self.answered += len(results)
                for item in results:
                    if "result" in item:
                        self.predicted += 1
                    else:
                        self.errors[item.get("error_reason", "?")] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each with one /predict in flight")
    parser.add_argument("--tasks-per-call", type=int, default=4)
    parser.add_argument("--bad-fraction", type=float, default=0.2, help="share of tasks with a broken image URL")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.2,
                        help="part of the run before the RSS baseline is taken (at least 60 s or half the run)")
    parser.add_argument("--config", default=str(TOY_CONFIG))
    parser.add_argument("--checkpoint", default=str(TOY_CHECKPOINT))
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--json", help="write the result here (default: bench/results/soak-<UTC time>.json)")
    args = parser.parse_args()
    args.json = args.json or str(ROOT / "bench" / "results" / f"soak-{stamp()}.json")
    run_info = provenance({k: v for k, v in vars(args).items() if k != "json"})

    import ray
    from ray import serve

    from serve_app import AppArgs, build_app
    from tests.serve_fixtures import free_port, wait_ready

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        web_root = Path(tmp) / "web"
        web_root.mkdir()
        names = make_images(web_root, 24)
        with ImageServer(web_root) as web, ImageServer(web_root, latency_s=3.0) as slow:
            good = [f"{web.url}/{n}" for n in names]
            bad = [f"{web.url}/status/404", f"{web.url}/status/503", f"{web.url}/html", f"{web.url}/noise.png",
                   f"{web.url}/redirect-loop", f"{web.url}/missing.png", f"{slow.url}/{names[0]}",
                   "/data/upload/../../etc/passwd", "ftp://127.0.0.1/x.png"]
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            try:
                port = free_port()
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                app_args = AppArgs(config_file=args.config, checkpoint_file=args.checkpoint,
                                   image_dir=str(Path(tmp) / "upload"), allowed_hosts=["127.0.0.1"])
                serve.run(build_app(app_args), name=APP, route_prefix="/", blocking=False)
                url = f"http://127.0.0.1:{port}"
                wait_ready(url, 300)
                return run(args, url, good, bad, run_info)
            finally:
                serve.shutdown()
                ray.shutdown()


def run(args, url: str, good: list[str], bad: list[str], run_info: dict) -> int:
    load = Load(url, good, bad, args.tasks_per_call, args.bad_fraction)
    duration = args.minutes * 60
    # At least a minute (or half the run): replicas' heaps grow while their
    # caches and pools fill; that is not a leak.
    warmup = max(duration * args.warmup_fraction, min(60.0, duration / 2))
    samples: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    pids_seen: dict[str, set[int]] = collections.defaultdict(set)
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    print(f"soak: {args.minutes:g} min, {args.concurrency} clients x {args.tasks_per_call} tasks, "
          f"{args.bad_fraction:.0%} broken URLs, RSS every {args.sample_s:g} s", flush=True)
    next_report = started
    while time.monotonic() - started < duration:
        now = time.monotonic() - started
        for name, pid in serve_actor_pids().items():
            rss = rss_bytes(pid)
            pids_seen[name].add(pid)
            if rss:
                samples[name].append((now, rss))
        if time.monotonic() >= next_report:
            with load.lock:
                print(f"  t={now:6.0f}s calls={load.calls} sent={load.sent} answered={load.answered} "
                      f"predicted={load.predicted} http_failures={sum(load.http_failures.values())}", flush=True)
            next_report += 60
        time.sleep(max(0.0, min(args.sample_s, duration - (time.monotonic() - started))))
    load.stop.set()
    for t in threads:
        t.join(130)
    elapsed = time.monotonic() - started

    print(f"\nRSS per Serve actor (baseline = first sample after {warmup:.0f} s warm-up):")
    print(f"  {'actor':40s} {'baseline MB':>12s} {'end MB':>8s} {'max MB':>8s} {'growth':>8s}  restarts  "
          "trend after warm-up (MB at 0/25/50/75/100 %)")
    memory = {}
    worst = 0.0
    for name in sorted(samples, key=short_name):
        points = samples[name]
        after = [rss for t, rss in points if t >= warmup] or [points[-1][1]]
        # median of the last three samples: one GC-timing blip is not growth
        end = statistics.median(rss for _, rss in points[-3:])
        base, peak = after[0], max(rss for _, rss in points)
        growth = (end - base) / base * 100
        restarts = len(pids_seen[name]) - 1
        if name.startswith("SERVE_REPLICA::"):
            worst = max(worst, growth)
        trend = [after[min(len(after) - 1, round(q * (len(after) - 1)))] / 2**20 for q in (0, 0.25, 0.5, 0.75, 1)]
        memory[short_name(name)] = {"baseline_mb": base / 2**20, "end_mb": end / 2**20, "max_mb": peak / 2**20,
                                    "growth_pct": growth, "restarts": restarts, "samples": len(points),
                                    "timeline_mb": [(round(t), round(rss / 2**20, 1)) for t, rss in points]}
        print(f"  {short_name(name):40s} {base / 2**20:12.1f} {end / 2**20:8.1f} {peak / 2**20:8.1f} "
              f"{growth:+7.1f}%  {restarts:8d}  " + " ".join(f"{v:.0f}" for v in trend))
    lat = sorted(load.latencies) or [0.0]
    flat = worst <= 5.0
    complete = load.sent == load.answered
    summary = {
        "provenance": run_info,
        "load_average_at_end_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "warmup_s": warmup, "sample_s": args.sample_s,
        "minutes": elapsed / 60, "concurrency": args.concurrency, "tasks_per_call": args.tasks_per_call,
        "bad_fraction": args.bad_fraction,
        "calls": load.calls, "tasks_sent": load.sent, "tasks_answered": load.answered,
        "predicted": load.predicted, "errors_by_reason": dict(load.errors),
        "calls_not_answered": dict(load.http_failures),
        "tasks_per_s": load.answered / elapsed,
        "call_latency_s": {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "max": lat[-1]},
        "memory": memory, "worst_replica_growth_pct": worst,
        "replica_restarts": sum(m["restarts"] for m in memory.values()),
        "goals": {"memory_flat_within_5_pct": flat, "every_task_answered": complete},
    }
    print(f"\ntasks sent {load.sent}, answered {load.answered} ({load.predicted} predictions, "
          f"{sum(load.errors.values())} error items: {dict(load.errors)}); calls not answered: "
          f"{dict(load.http_failures) or 0}")
    print(f"throughput {summary['tasks_per_s']:.1f} tasks/s; "
          f"call latency p50 {summary['call_latency_s']['p50']:.2f} s, "
          f"p99 {summary['call_latency_s']['p99']:.2f} s, max {summary['call_latency_s']['max']:.2f} s")
    print(f"memory flat within 5 %: {'yes' if flat else 'NO'} (worst replica {worst:+.1f} %); "
          f"every task answered: {'yes' if complete else 'NO'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"result written to {args.json}")
    return 0 if flat and complete else 1


if __name__ == "__main__":
    sys.exit(main())
