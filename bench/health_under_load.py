#!/usr/bin/env python
"""/health while the shipped service's CPU is saturated, with the throughput
against the raw floor measured in the same run.

    .venv/bin/python -m bench.health_under_load [--model faster-rcnn] [--tasks 16] [--rounds 2]

`serve run` on the shipped serve_config.yaml (eager; images from a local HTTP
server), then per round: one /predict of N tasks and N one-task calls 4 at a
time, with /health polled every 0.5 s throughout (serving_bench's sampler).
Writes bench/results/health-<stamp>.json (every /health latency, p50, max).
Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.provenance import provenance, stamp
from bench.serving_bench import MODELS, UPLOAD_SUBDIR, Sampler, Service, make_images, measure_raw_floor
from tests.image_server import ImageServer
from tests.model_fixtures import save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="faster-rcnn", choices=sorted(MODELS))
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="health-under-load-"))
    names = make_images(tmp / "uploads" / UPLOAD_SUBDIR)
    paths = [str(tmp / "uploads" / UPLOAD_SUBDIR / n) for n in names]
    model = MODELS[opts.model]
    checkpoint = str(save_random_checkpoint(model, tmp / "model.pth"))
    threads = len(os.sched_getaffinity(0))
    result = {"provenance": provenance({**vars(opts), "serve_config": "serve_config.yaml"}), "rounds": []}
    result["raw_floor"] = measure_raw_floor(model, checkpoint, paths, threads, opts.tasks // 2, "eager")
    env = {"CONFIG_FILE": model, "CHECKPOINT_FILE": checkpoint, "IMAGE_DIR": str(tmp / "uploads")}
    health: list[float] = []
    with ImageServer(tmp / "uploads" / UPLOAD_SUBDIR) as web, \
            Service(tmp, env, {"allowed_hosts": ["127.0.0.1"], "model_acceleration": "eager"}) as svc:
        urls = [f"{web.url}/{n}" for n in names]
        result["ready"] = svc.ready_line()
        for _ in range(opts.rounds):
            with Sampler(svc) as sampler:
                predict = opts.tasks / svc.predict([urls[i % len(urls)] for i in range(opts.tasks)])
                start = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda i: svc.predict([urls[i % len(urls)]]), range(opts.tasks)))
                calls = opts.tasks / (time.perf_counter() - start)
            health += sampler.health_s
            result["rounds"].append({"predict_images_per_s": predict, "one_task_c4_images_per_s": calls,
                                     "health_s": sampler.health_s})
        result["error_items"] = svc.errors
    floor = result["raw_floor"]["images_per_s"]
    ordered = sorted(health)
    result["summary"] = {
        "health_samples": len(ordered), "health_p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
        "health_max_ms": round(1000 * ordered[-1], 1),
        "predict_over_raw": [round(r["predict_images_per_s"] / floor, 3) for r in result["rounds"]],
        "one_task_c4_over_raw": [round(r["one_task_c4_images_per_s"] / floor, 3) for r in result["rounds"]]}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"health-{stamp()}-{opts.model}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"]), f"\nwrote {path}")


if __name__ == "__main__":
    main()
