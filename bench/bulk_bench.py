#!/usr/bin/env python
"""A whole-project pre-annotation job against the raw model floor, in one run.

    .venv/bin/python -m bench.bulk_bench                      # CPU: RTMDet-tiny, 500 tasks
    .venv/bin/python -m bench.bulk_bench --model faster-rcnn --shipped serve_config.gpu.yaml   # a GPU box (batch 16)

1. the raw floor: decode + model in one process, eager, one image at a time,
   as many torch threads as the served Detector runs (bench.serving_bench);
2. a real Label Studio 1.23 (tests/labelstudio_server.py) with a project of
   N image-URL tasks (640x480 JPEGs from a local HTTP server);
3. `serve run` on the shipped serve_config.yaml (or --shipped; model from CONFIG_FILE /
   CHECKPOINT_FILE, the key from LABEL_STUDIO_API_KEY, the jobs API behind
   JOBS_TOKEN), acceleration eager, and one job over the whole project
   (POST /jobs): images/s from the POST to state done, listing, loading,
   inference and write-back included, the predictions Label Studio holds,
   and the latency of a one-task /predict every 10 s during the job (an
   annotator opening a task) next to one batch's time.
Label Studio shares the cores with the service in this run.
Results: bench/results/bulk-<stamp>.json with provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests

from bench.provenance import provenance, stamp
from bench.serving_bench import LABEL_CONFIG, MODELS, Service, make_images, measure_raw_floor
from tests.image_server import ImageServer
from tests.model_fixtures import save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
JOBS_TOKEN = "bulk-bench-jobs-token-0123456789"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rtmdet-tiny", choices=sorted(MODELS))
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="raw floor torch threads (default: the cores)")
    p.add_argument("--floor-images", type=int, default=24)
    p.add_argument("--shipped", default="serve_config.yaml", help="serve config to run (GPU: serve_config.gpu.yaml)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    threads = opts.threads or len(os.sched_getaffinity(0))
    from tests.labelstudio_server import LabelStudioServer

    tmp = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    names = make_images(tmp / "images")
    paths = [str(tmp / "images" / n) for n in names]
    model = MODELS[opts.model]
    checkpoint = str(save_random_checkpoint(model, tmp / f"{opts.model}.pth"))
    result: dict = {"provenance": provenance({**vars(opts), "serve_config": opts.shipped})}
    print("raw floor ...", flush=True)
    result["raw_floor"] = measure_raw_floor(model, checkpoint, paths, threads, opts.floor_images, "eager")
    with ImageServer(tmp / "images") as images, LabelStudioServer() as ls:
        project = ls.client.create_project(LABEL_CONFIG, title="bulk bench")["id"]
        data = [{"image": f"{images.url}/{names[i % len(names)]}"} for i in range(opts.tasks)]
        for start in range(0, len(data), 250):
            ls.client.import_tasks(project, data[start:start + 250])
        env = {"CONFIG_FILE": model, "CHECKPOINT_FILE": checkpoint, "LABEL_STUDIO_URL": ls.url,
               "LABEL_STUDIO_API_KEY": ls.client.legacy_token(), "JOBS_TOKEN": JOBS_TOKEN}
        args = {"allowed_hosts": ["127.0.0.1"], "model_acceleration": "eager"}
        print("service ...", flush=True)
        with Service(tmp, env, args, shipped=opts.shipped) as svc:
            headers = {"Authorization": f"Bearer {JOBS_TOKEN}"}
            started = time.perf_counter()
            answer = requests.post(f"{svc.url}/jobs", json={"project": project}, headers=headers, timeout=30)
            answer.raise_for_status()
            job_id = answer.json()["job"]["id"]
            interactive = []  # an annotator opening a task while the job runs: one-task /predict latency
            next_probe = started + 10.0
            while True:
                job = requests.get(f"{svc.url}/jobs/{job_id}", headers=headers, timeout=30).json()["job"]
                if job["state"] in ("done", "failed", "cancelled", "lost"):
                    break
                if time.perf_counter() >= next_probe and job["state"] == "running":
                    interactive.append(round(svc.predict([data[len(interactive) % len(data)]["image"]]), 3))
                    next_probe = time.perf_counter() + 10.0
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            result["service_ready"] = svc.ready_line()
        stored = len(ls.client.get("/api/predictions", params={"project": project}))
    result["job"] = {k: job[k] for k in ("state", "total", "done", "failed", "written", "images_per_s", "message")}
    result["job"]["wall_s"] = round(seconds, 2)
    result["job"]["images_per_s_wall"] = round(opts.tasks / seconds, 3)
    result["stored_predictions"] = stored
    # One CPU batch (max_batch_size 4, images one by one) at the raw floor's speed, for comparison.
    batch_s = 4 / result["raw_floor"]["images_per_s"]
    result["interactive_during_job"] = {"latencies_s": interactive, "one_batch_s": round(batch_s, 3),
                                        "one_image_s": round(1 / result["raw_floor"]["images_per_s"], 3)}
    result["ratio_to_raw_floor"] = round(result["job"]["images_per_s_wall"] / result["raw_floor"]["images_per_s"], 3)
    result["summary"] = (f"{opts.model}, {opts.tasks} tasks: job {result['job']['images_per_s_wall']} img/s "
                         f"(POST to done), raw floor {result['raw_floor']['images_per_s']:.3f} img/s: "
                         f"{result['ratio_to_raw_floor']}x; {stored} predictions stored; state {job['state']}; "
                         f"one-task /predict during the job: {interactive} s (one batch: {batch_s:.2f} s)")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bulk-{stamp()}-{opts.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(result["summary"], f"\nwrote {path}")


if __name__ == "__main__":
    main()
