#!/usr/bin/env python
"""Where the CPU goes while the served graph is under load.

    .venv/bin/python -m bench.profile_served [--model rtmdet-tiny] [--seconds 20]   # from the repository root

Starts the shipped service like serving_bench.py, drives one-task requests at
concurrency 4, and meanwhile (1) records CPU seconds per process from /proc,
(2) samples the Detector replica with py-spy (pip install py-spy) and prints
the hottest frames. Not a test.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.serving_bench import MODELS, Service, make_images
from tests.image_server import ImageServer
from tests.model_fixtures import save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:90]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(pid)] = (cmd or stat.split("(")[1].split(")")[0], (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="rtmdet-tiny")
    p.add_argument("--seconds", type=float, default=20)
    opts = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="profile-served-"))
    names = make_images(tmp / "images")
    checkpoint = save_random_checkpoint(MODELS[opts.model], tmp / "model.pth")
    env = {"CONFIG_FILE": MODELS[opts.model], "CHECKPOINT_FILE": str(checkpoint), "IMAGE_DIR": str(tmp / "u")}
    with ImageServer(tmp / "images") as images, Service(tmp, env, {"allowed_hosts": ["127.0.0.1"]}) as svc:
        urls = [f"{images.url}/{n}" for n in names]
        stop = threading.Event()

        def client(i):
            while not stop.is_set():
                svc.predict([urls[i % len(urls)]])
                i += 1

        pool = ThreadPoolExecutor(4)
        for i in range(4):
            pool.submit(client, i)
        time.sleep(5)
        detector = subprocess.run(["pgrep", "-f", "ServeReplica:mmdet-backend:Detector"], capture_output=True,
                                  text=True).stdout.split()
        before = cpu_seconds()
        raw = tmp / "detector.txt"
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", detector[0], "-d",
                                str(int(opts.seconds)), "-f", "raw", "-o", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(opts.seconds)
        after = cpu_seconds()
        spy.wait(30)
        stop.set()
        pool.shutdown(wait=True)
    used = sorted(((after[p][1] - before[p][1], after[p][0]) for p in after if p in before), reverse=True)
    total = sum(u for u, _ in used)
    print(f"\nCPU seconds over {opts.seconds:.0f} s of load (machine: {os.cpu_count()} cores), {total:.1f} s in all:")
    for u, cmd in used[:12]:
        print(f"  {u:6.1f} s  {100 * u / total:5.1f} %  {cmd}")
    if raw.is_file():
        frames = collections.Counter()
        samples = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples += int(count)
            leaf = stack.split(";")[-1] if stack else "?"
            frames[leaf] += int(count)
        print(f"\nDetector replica, py-spy leaf frames ({samples} samples):")
        for frame, n in frames.most_common(12):
            print(f"  {100 * n / max(samples, 1):5.1f} %  {frame[:110]}")


if __name__ == "__main__":
    main()
