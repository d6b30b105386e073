"""Why the Detector builds and runs its model in one thread: libgomp (torch's
OpenMP) counts the idle worker team of every thread that ever ran a parallel
region; once there are more such threads than cores, workers stop spinning
between regions and each region pays a wake-up.

    python -m bench.omp_threads [--model rtmdet_tiny_8xb32-300e_coco] [--images 20] [--repeats 2]

Each mode runs in a fresh process, the modes interleaved `--repeats` times
(this machine's speed drifts; compare within a repeat): decode + model on
the main thread ("main"); built and run in a second thread with the main
thread never touching torch ("thread"); the same after the main thread ran
one parallel region ("thread_after_main", what the Detector did before).
Writes bench/results/omp-threads-<stamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.provenance import provenance, stamp

ROOT = Path(__file__).resolve().parent.parent
MODES = ("main", "thread", "thread_after_main")


def child(mode: str, model: str, n: int, images: list[str]) -> None:
    blobs = [Path(p).read_bytes() for p in images]
    threads = len(os.sched_getaffinity(0))

    def work():
        import cv2
        import torch

        from mmdet_ls.images import decode_image
        from mmdet_ls.inference import BatchDetector
        from mmdet_ls.model_files import resolve_config_file

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        det = BatchDetector(resolve_config_file(model), None, "cpu", acceleration="eager")
        det.detect([decode_image(blobs[0]).bgr], stacked=False)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(n):
            det.detect([decode_image(blobs[i % len(blobs)]).bgr], stacked=False)
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return {"images_per_s": n / seconds, "busy_cores": cpu / seconds}

    if mode == "main":
        out = work()
    else:
        if mode == "thread_after_main":
            import torch

            torch.set_num_threads(threads)
            (torch.randn(512, 512) @ torch.randn(512, 512)).sum()  # one parallel region on the main thread
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(work).result()
    print("OMP_RESULT " + json.dumps({"mode": mode, "threads": threads, **out}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rtmdet_tiny_8xb32-300e_coco")
    p.add_argument("--images", type=int, default=20, help="images per measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    if opts.child:
        return child(opts.child, opts.model, opts.images, opts.files)

    import tempfile

    from bench.serving_bench import make_images

    tmp = Path(tempfile.mkdtemp(prefix="omp-threads-"))
    files = [str(tmp / n) for n in make_images(tmp)]
    runs = []
    for repeat in range(opts.repeats):
        for mode in MODES:
            cmd = [sys.executable, "-m", "bench.omp_threads", "--child", mode, "--model", opts.model,
                   "--images", str(opts.images), "--files", *files]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((t for t in out.stdout.splitlines() if t.startswith("OMP_RESULT ")), None)
            if line is None:
                raise RuntimeError(out.stderr[-3000:])
            runs.append({"repeat": repeat, **json.loads(line[len("OMP_RESULT "):])})
            print(runs[-1], flush=True)
    ratios = {}
    for mode in MODES[1:]:
        ratios[mode] = [round(r["images_per_s"] / m["images_per_s"], 3) for r in runs if r["mode"] == mode
                        for m in runs if m["mode"] == "main" and m["repeat"] == r["repeat"]]
    result = {"provenance": provenance(vars(opts)), "runs": runs, "ratio_to_main_per_repeat": ratios}
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"omp-threads-{stamp()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios), f"\nwrote {path}")


if __name__ == "__main__":
    main()
