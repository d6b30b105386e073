#!/usr/bin/env python
"""Where the graph's CPU goes per one-task call, with the no-op model.

    .venv/bin/python -m bench.noop_profile [--calls 600] [--concurrency 16]   # from the repository root

Starts the shipped config with the no-op model (bench/noop_app.py; images
from image_dir, as serving_bench's ceiling does), sends one-task calls C at
a time, and records CPU seconds per process (from /proc) over those calls:
the milliseconds of CPU each process spends per call. Optionally samples
the ingress with py-spy (--py-spy) and keeps its hottest frames. Writes
bench/results/noop-profile-<stamp>.json with provenance.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.profile_served import cpu_seconds
from bench.provenance import provenance, stamp
from bench.serving_bench import RTMDET_TINY, UPLOAD_SUBDIR, Service, make_images

ROOT = Path(__file__).resolve().parent.parent


def hottest_frames(raw: Path, top: int = 25) -> list[tuple[str, float]]:
    """Share of the active samples by frame, inclusive (py-spy's raw format)."""
    counts, total = collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in set(stack.split(";")):
            counts[frame[:120]] += int(n)
    return [(frame, round(100 * n / max(total, 1), 1)) for frame, n in counts.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--py-spy", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="noop-profile-"))
    upload_dir = tmp / "uploads"
    names = make_images(upload_dir / UPLOAD_SUBDIR)
    (tmp / "noop.pth").write_bytes(b"never loaded")
    env = {"CONFIG_FILE": RTMDET_TINY, "CHECKPOINT_FILE": str(tmp / "noop.pth"), "IMAGE_DIR": str(upload_dir)}
    uploads = [f"/data/upload/{UPLOAD_SUBDIR}/{n}" for n in names]
    result = {"provenance": provenance(vars(opts))}
    with Service(tmp, env, noop=True) as svc:
        sessions = [requests.Session() for _ in range(opts.concurrency)]

        def call(i):
            return svc.predict([uploads[i % len(uploads)]], sessions[i % opts.concurrency])

        with ThreadPoolExecutor(opts.concurrency) as pool:
            list(pool.map(call, range(64)))  # warm-up
        spy = None
        if opts.py_spy:
            ingress = subprocess.run(["pgrep", "-f", "ServeReplica:mmdet-backend:LabelStudioIngress"],
                                     capture_output=True, text=True).stdout.split()
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", ingress[0], "-d",
                                    "8", "-r", "100", "-f", "raw", "-o", str(tmp / "ingress.txt"), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before, started = cpu_seconds(), time.perf_counter()
        with ThreadPoolExecutor(opts.concurrency) as pool:
            list(pool.map(call, range(opts.calls)))
        elapsed, after = time.perf_counter() - started, cpu_seconds()
        if spy:
            spy.wait(60)
    used = sorted(((after[pid][1] - before[pid][1], after[pid][0]) for pid in after if pid in before), reverse=True)
    result["calls_per_s"] = opts.calls / elapsed
    result["cpu_ms_per_call"] = [{"process": cmd, "ms": round(1000 * s / opts.calls, 2)} for s, cmd in used[:14]]
    result["cpu_ms_per_call_total"] = round(1000 * sum(s for s, _ in used) / opts.calls, 2)
    if opts.py_spy and (tmp / "ingress.txt").is_file():
        result["ingress_frames_inclusive_pct"] = hottest_frames(tmp / "ingress.txt")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"noop-profile-{stamp()}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{result['calls_per_s']:.1f} calls/s; CPU ms per call, {result['cpu_ms_per_call_total']} in all:")
    for row in result["cpu_ms_per_call"]:
        print(f"  {row['ms']:7.2f}  {row['process'][:80]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
