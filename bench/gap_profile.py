#!/usr/bin/env python
"""Where the served/raw gap goes: the same model measured in layers, repeated
and interleaved, with the CPU of every process on the machine.

    .venv/bin/python -m bench.gap_profile [--models rtmdet-tiny,faster-rcnn] [--repeats 3]

Per model and repeat, on the same 640x480 JPEGs, eager, 2 torch threads:

1. `raw_alone`: the raw floor (serving_bench's: decode + model, one process);
2. `detector_via_handle`: the Detector deployment alone in Serve (no ingress,
   loader, proxy), fed decoded images through its handle, 4 calls at a time;
3. the shipped service (`serve run serve_config.yaml`, image_dir) with ONE
   Detector replica on every core (the layout whose gap this explains; the
   shipped default is now two replicas: docs/performance.md), settled,
   then: the CPU of every process over `--idle-s` seconds of idle;
   `raw_beside_idle_service`: the raw floor again while the idle service runs;
   `served`: one /predict of N tasks; `served_health_2hz`: the same with
   /health polled every 0.5 s (serving_bench's sampler),
   with the CPU of every process during `served`.

Ratios are taken within a repeat (this machine's speed drifts by several
per cent over minutes), medians over repeats. Writes
bench/results/gap-<stamp>.json. Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.profile_served import cpu_seconds
from bench.provenance import provenance, stamp
from bench.serving_bench import MODELS, UPLOAD_SUBDIR, Sampler, Service, make_images, measure_raw_floor
from tests.model_fixtures import save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ROLES = (  # first match wins: (role, substring of the command line)
    ("Detector replica", "ServeReplica:mmdet-backend:Detector"),
    ("other replicas", "ServeReplica:"),
    ("Serve controller + proxy", "ServeController"), ("Serve controller + proxy", "ProxyActor"),
    ("Ray core (gcs, raylet, dashboard, agents, monitors)", "ray/"),
    ("Ray core (gcs, raylet, dashboard, agents, monitors)", "ray::"),
)


def cores_by_role(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Busy cores per role between two cpu_seconds() snapshots."""
    me = os.getpid()
    roles: dict[str, float] = {}
    for pid, (cmd, cpu) in after.items():
        if pid not in before:
            continue
        role = "this bench (client)" if pid == me else next(
            (r for r, key in ROLES if key in cmd), "rest of the machine")
        roles[role] = roles.get(role, 0.0) + (cpu - before[pid][1]) / seconds
    return {r: round(v, 4) for r, v in sorted(roles.items(), key=lambda kv: -kv[1])}


def detector_main(opts) -> None:
    """Subprocess mode: the Detector deployment alone, fed through its handle."""
    import ray
    from ray import serve

    from deployments.detector import Detector
    from mmdet_ls.images import decode_image
    from mmdet_ls.model_files import resolve_config_file

    ray.init(address="local", num_cpus=opts.threads, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        app = Detector.options(ray_actor_options={"num_cpus": opts.threads}).bind(
            resolve_config_file(opts.config), opts.checkpoint, "cpu")
        handle = serve.run(app, name="gap-profile")
        images = [decode_image(Path(p).read_bytes()) for p in opts.images]
        handle.detect_group.remote([images[0]]).result(timeout_s=600)

        async def drive() -> float:
            gate = asyncio.Semaphore(4)

            async def one(i):
                async with gate:
                    return await handle.detect_group.remote([images[i % len(images)]])

            start = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(opts.count)))
            return time.perf_counter() - start

        seconds = asyncio.run(drive())
        print("DETECTOR " + json.dumps({"images_per_s": opts.count / seconds, "images": opts.count}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def detector_via_handle(config: str, checkpoint: str, images: list[str], threads: int, count: int) -> dict:
    cmd = [sys.executable, "-m", "bench.gap_profile", "--detector-only", "--config", config, "--checkpoint",
           checkpoint, "--threads", str(threads), "--count", str(count), "--images", *images]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((t for t in out.stdout.splitlines() if t.startswith("DETECTOR ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("DETECTOR "):])


def one_repeat(name: str, tmp: Path, checkpoint: str, paths: list[str], uploads: list[str], opts) -> dict:
    model = MODELS[name]
    n = opts.tasks if name != "faster-rcnn" else max(4, opts.tasks // 3)
    rep: dict = {"images": n}
    rep["raw_alone"] = measure_raw_floor(model, checkpoint, paths, opts.threads, n, "eager")["images_per_s"]
    rep["detector_via_handle"] = detector_via_handle(model, checkpoint, paths, opts.threads, n)["images_per_s"]
    env = {"CONFIG_FILE": model, "CHECKPOINT_FILE": checkpoint, "IMAGE_DIR": str(tmp / "uploads")}
    with Service(tmp, env, {"allowed_hosts": ["127.0.0.1"], "model_acceleration": "eager"},
                 detector_layout=(1, opts.threads)) as svc:
        before = cpu_seconds()
        time.sleep(opts.idle_s)
        rep["idle_cores"] = cores_by_role(before, cpu_seconds(), opts.idle_s)
        rep["raw_beside_idle_service"] = measure_raw_floor(model, checkpoint, paths, opts.threads, n,
                                                           "eager")["images_per_s"]
        batch = [uploads[i % len(uploads)] for i in range(n)]
        svc.predict(batch[:2])  # warm-up
        before = cpu_seconds()
        seconds = svc.predict(batch)
        rep["served_cores"] = cores_by_role(before, cpu_seconds(), seconds)
        rep["served"] = n / seconds
        with Sampler(svc):
            rep["served_health_2hz"] = n / svc.predict(batch)
        rep["error_items"] = svc.errors
    return rep


def summarise(reps: list[dict]) -> dict:
    def med(key: str, over: str = "raw_alone") -> float:
        return round(statistics.median(r[key] / r[over] for r in reps), 3)

    return {
        "detector_via_handle / raw_alone": med("detector_via_handle"),
        "raw_beside_idle_service / raw_alone": med("raw_beside_idle_service"),
        "served / raw_alone": med("served"),
        "served / raw_beside_idle_service": med("served", "raw_beside_idle_service"),
        "served_health_2hz / served": med("served_health_2hz", "served"),
        "idle service, busy cores (median)": round(statistics.median(
            sum(v for role, v in r["idle_cores"].items() if role not in ("this bench (client)", "rest of the machine"))
            for r in reps), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config"), p.add_argument("--checkpoint"), p.add_argument("--images", nargs="*")
    p.add_argument("--count", type=int, default=24, help=argparse.SUPPRESS)
    p.add_argument("--models", default="rtmdet-tiny,faster-rcnn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", type=int, default=24, help="images per measurement (Faster R-CNN: a third)")
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    if opts.detector_only:
        return detector_main(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gap-{stamp()}.json"
    tmp = Path(tempfile.mkdtemp(prefix="gap-profile-"))
    names = make_images(tmp / "uploads" / UPLOAD_SUBDIR)
    paths = [str(tmp / "uploads" / UPLOAD_SUBDIR / n) for n in names]
    uploads = [f"/data/upload/{UPLOAD_SUBDIR}/{n}" for n in names]
    skip = ("detector_only", "config", "checkpoint", "images")
    config = {k: v for k, v in vars(opts).items() if k not in skip}
    results = {"provenance": provenance({**config, "serve_config": "serve_config.yaml"}), "models": {}}
    for name in opts.models.split(","):
        checkpoint = str(save_random_checkpoint(MODELS[name], tmp / f"{name}.pth"))
        reps = []
        for r in range(opts.repeats):
            print(f"[{name}] repeat {r + 1}/{opts.repeats} ...", flush=True)
            reps.append(one_repeat(name, tmp, checkpoint, paths, uploads, opts))
            results["models"][name] = {"config": MODELS[name], "repeats": reps, "summary": summarise(reps)}
            path.write_text(json.dumps(results, indent=2))  # a later failure keeps what was measured
        print(f"[{name}] " + json.dumps(results["models"][name]["summary"]), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
