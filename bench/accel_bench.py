#!/usr/bin/env python
"""Past the eager floor: channels_last and torch.compile of backbone + neck, on mixed image sizes.

    .venv/bin/python -m bench.accel_bench                               # RTMDet-tiny + Faster R-CNN, random init
    .venv/bin/python -m bench.accel_bench --models faster-rcnn --rounds 2

(from the repository root, like every bench script). For each model, on images
of six sizes (640x480, 480x640, 1280x720, 1000x1000, 320x256, 1920x1080), one
image at a time through BatchDetector.detect (pipeline + model, as the
Detector runs it on a CPU), with --threads torch threads:

- images/s for eager, channels_last, compile (mmdet_ls.acceleration: dynamic
  height/width when the warm-up inputs vary in size; frozen weights on the
  CPU), compile-unfrozen (the same without inductor's freezing) and compile-bucket (the
  alternative to dynamic shapes: the backbone input padded up to one of a few
  fixed shapes, one static graph per shape, feature maps cropped back), rounds
  interleaved so that other work on the machine disturbs every mode alike;
  the best and the median round, and the best seconds per image size;
- the backbone input shapes the images produce, and the compilations each
  compiled mode made during the timed rounds (0: no recompilation per size);
- compile time at start-up: cold (a new process, an empty compile cache) and
  warm (a new process, the cache the cold one filled), the second one as the
  Detector's `auto` does it, with the mode auto chose and why.

Results: bench/results/<stamp>-accel.json with provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import provenance, stamp
from tests.model_fixtures import FASTER_RCNN, RTMDET_TINY, save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"rtmdet-tiny": RTMDET_TINY, "faster-rcnn": FASTER_RCNN}
SIZES = [(640, 480), (480, 640), (1280, 720), (1000, 1000), (320, 256), (1920, 1080)]  # (width, height)
# compile-bucket: the smallest of these (H, W) that holds the backbone input; Faster R-CNN's inputs are
# at most 800 x 1344 either way round after its 1333x800 keep-ratio resize, RTMDet's always 640 x 640.
BUCKETS = [(640, 640), (800, 1344), (1344, 800)]


def images() -> list:
    import numpy as np

    from tests.toy_detector.scenes import make_scene

    return [np.ascontiguousarray(np.asarray(make_scene(100 + i, w, h)[0])[:, :, ::-1])
            for i, (w, h) in enumerate(SIZES)]


def startup_images() -> list:
    """The Detector's warm-up inputs when mmdet_ls.inference has them (three aspect ratios)."""
    try:
        from mmdet_ls.inference import warmup_images
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((480, 640), (640, 480), (720, 1280))]
    return warmup_images()


def backbone_shapes(det, imgs) -> list[tuple[int, int]]:
    out = []
    for i, img in enumerate(imgs):
        p = det._prepare(img, i)
        data = det.model.data_preprocessor({"inputs": [p["inputs"]], "data_samples": [p["data_samples"]]}, False)
        out.append(tuple(int(d) for d in data["inputs"].shape[-2:]))
    return out


class BucketFeatures:
    """extract_feat on a backbone input padded up to a bucket shape, compiled static (one graph per bucket),
    feature maps cropped back to what the unpadded input gives. Near the bottom and right edges the
    features differ from eager (the convolutions see padding where eager sees the border)."""

    def __init__(self, model, buckets):
        import torch
        from torch._dynamo import lookup_backend

        from mmdet_ls.acceleration import _backbone_neck

        inductor = lookup_backend("inductor")
        self.compiles = 0
        self.buckets = sorted(buckets, key=lambda b: b[0] * b[1])
        self.error = None

        def count(gm, example_inputs):
            self.compiles += 1
            return inductor(gm, example_inputs)  # no freezing: compare with compile-unfrozen

        backbone, neck = model.backbone, model.neck
        self._compiled = torch.compile(lambda x: _backbone_neck(backbone, neck, x), backend=count, dynamic=False)

    def __call__(self, x):
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        bh, bw = next(((bh, bw) for bh, bw in self.buckets if h <= bh and w <= bw), (h, w))
        feats = self._compiled(F.pad(x, (0, bw - w, 0, bh - h)))
        return tuple(f[..., :math.ceil(h * f.shape[-2] / bh), :math.ceil(w * f.shape[-1] / bw)].contiguous()
                     for f in feats)


def bucket_feature_error(det, img) -> float:
    """Max |bucket - eager| over the feature maps, relative to eager's largest magnitude."""
    import torch

    p = det._prepare(img, 0)
    x = det.model.data_preprocessor({"inputs": [p["inputs"]], "data_samples": [p["data_samples"]]}, False)["inputs"]
    with torch.no_grad():
        want = type(det.model).extract_feat(det.model, x)
        got = det.model.extract_feat(x)
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


def measure(name: str, config: str, checkpoint: str, threads: int, rounds: int) -> dict:
    """In this process: every mode, rounds interleaved."""
    import torch

    from mmdet_ls.acceleration import _CompiledFeatures, accelerate, compile_count, set_mode
    from mmdet_ls.inference import BatchDetector

    torch.set_num_threads(threads)
    det = BatchDetector(config, checkpoint, "cpu")
    model = det.model
    imgs = images()
    shapes = backbone_shapes(det, imgs)
    start = startup_images()
    warm = lambda: det.detect(start, stacked=False)  # noqa: E731
    out: dict = {"config": config, "backbone_input_shapes": [list(s) for s in shapes],
                 "distinct_shapes": len(set(shapes)), "modes": {}}

    print(f"[{name}] compile (as at start-up) ...", flush=True)
    report = accelerate(model, "compile", warmup=warm, images=len(start), repeats=0)
    out["compile_startup"] = report.as_dict()
    unfrozen = _CompiledFeatures(model.backbone, model.neck, "inductor", report.dynamic, freezing=False)
    set_mode(model, "eager")
    model.extract_feat = unfrozen
    t0 = time.perf_counter()
    det.detect(start, stacked=False)
    out["unfrozen_compile_s"] = round(time.perf_counter() - t0, 2)
    model.__dict__.pop("extract_feat", None)
    bucket = BucketFeatures(model, BUCKETS)
    set_mode(model, "eager")
    model.extract_feat = bucket
    t0 = time.perf_counter()
    det.detect(imgs[:1], stacked=False)
    det.detect(imgs, stacked=False)  # one static graph per bucket the images need
    out["bucket_compile_s"] = round(time.perf_counter() - t0, 2)
    out["bucket_feature_max_rel_error"] = bucket_feature_error(det, imgs[0])
    model.__dict__.pop("extract_feat", None)

    modes = ["eager", "channels_last", "compile", "compile-unfrozen", "compile-bucket"]
    passes = {m: [] for m in modes}
    per_size = {m: [math.inf] * len(imgs) for m in modes}
    compiles_before = {"compile": None, "compile-bucket": bucket.compiles, "compile-unfrozen": unfrozen.compiles}
    failures = {}

    def use(mode):
        if mode in ("compile-bucket", "compile-unfrozen"):
            set_mode(model, "eager")
            model.extract_feat = bucket if mode == "compile-bucket" else unfrozen
        else:
            set_mode(model, mode)
            if mode == "compile" and compiles_before["compile"] is None:
                compiles_before["compile"] = compile_count(model)

    for r in range(rounds):
        for mode in modes:
            use(mode)
            t0 = time.perf_counter()
            results = det.detect(imgs, stacked=False)
            passes[mode].append(time.perf_counter() - t0)
            for i, res in enumerate(results):
                if hasattr(res, "timings"):
                    per_size[mode][i] = min(per_size[mode][i], res.timings["model_s"])
                else:
                    failures.setdefault(mode, []).append(str(res))
        print(f"[{name}] round {r + 1}/{rounds}: " + ", ".join(f"{m} {passes[m][-1]:.2f} s" for m in modes),
              flush=True)
    use("compile")
    recompiles = {"compile": compile_count(model) - compiles_before["compile"],
                  "compile-bucket": bucket.compiles - compiles_before["compile-bucket"],
                  "compile-unfrozen": unfrozen.compiles - compiles_before["compile-unfrozen"]}
    eager_best = min(passes["eager"])
    for mode in modes:
        best, median = min(passes[mode]), statistics.median(passes[mode])
        out["modes"][mode] = {
            "images_per_s_best": len(imgs) / best,
            "images_per_s_median": len(imgs) / median,
            "speedup_vs_eager_best": eager_best / best,
            "speedup_vs_eager_median": statistics.median(passes["eager"]) / median,
            "pass_s": [round(p, 3) for p in passes[mode]],
            "best_s_per_size": {f"{w}x{h}": round(s, 3) for (w, h), s in zip(SIZES, per_size[mode], strict=True)},
            "compilations_during_rounds": recompiles.get(mode),
            "failures": failures.get(mode, []),
        }
    out["bucket_compilations_total"] = bucket.compiles
    set_mode(model, "eager")
    return out


def probe(config: str, checkpoint: str, threads: int, mode: str, cache: str) -> dict:
    """A new process: load, accelerate as the Detector does at start-up, report (compile cold or warm)."""
    cmd = [sys.executable, "-m", "bench.accel_bench", "--probe", mode, "--config", config,
           "--checkpoint", checkpoint, "--threads", str(threads), "--cache", cache]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "process_s": wall}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_s"] = round(wall, 2)
    return report


def run_probe(opts) -> None:
    import torch

    from mmdet_ls.acceleration import accelerate
    from mmdet_ls.inference import BatchDetector

    torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    det = BatchDetector(opts.config, opts.checkpoint, "cpu")
    load_s = time.perf_counter() - t0
    start = startup_images()
    t0 = time.perf_counter()
    report = accelerate(det.model, opts.probe, warmup=lambda: det.detect(start, stacked=False), images=len(start),
                        repeats=0 if opts.probe != "auto" else 2, cache_dir=opts.cache)
    out = {**report.as_dict(), "load_s": round(load_s, 2), "accelerate_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the images, per mode")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.probe:
        run_probe(opts)
        return

    from mmdet_ls.model_files import resolve_config_file

    names = [n.strip() for n in opts.models.split(",") if n.strip()]
    config = {"models": names, "threads": opts.threads, "rounds": opts.rounds, "sizes": SIZES, "buckets": BUCKETS}
    results = {"provenance": provenance(config), "models": {}}
    with tempfile.TemporaryDirectory(prefix="accel-bench-") as tmp:
        for name in names:
            checkpoint = str(save_random_checkpoint(MODELS[name], Path(tmp) / f"{name}.pth", seed=0))
            cfg = resolve_config_file(MODELS[name])
            cache = os.path.join(tmp, f"inductor-{name}")
            print(f"[{name}] cold start, empty compile cache ...", flush=True)
            cold = probe(cfg, checkpoint, opts.threads, "compile", cache)
            print(f"[{name}] warm start (auto), the cache the cold start filled ...", flush=True)
            warm = probe(cfg, checkpoint, opts.threads, "auto", cache)
            os.environ["MMDET_LS_COMPILE_CACHE"] = cache  # the timing process compiles from that cache too
            timed = measure(name, cfg, checkpoint, opts.threads, opts.rounds)
            results["models"][name] = {"startup_cold_compile": cold, "startup_warm_auto": warm, **timed}
            print(f"[{name}] " + ", ".join(f"{m} {v['images_per_s_best']:.3f} img/s ({v['speedup_vs_eager_best']:.2f}x)"
                                          for m, v in timed["modes"].items()), flush=True)
    results["summary"] = summary(results)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp()}-accel.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(results["summary"]))
    print(f"wrote {path}")


def summary(results: dict) -> list[str]:
    lines = [f"== {results['provenance']['machine']['cpus_usable']} cores, "
             f"{results['provenance']['config']['threads']} torch threads, mixed sizes =="]
    for name, m in results["models"].items():
        modes = ", ".join(f"{k} {v['images_per_s_best']:.3f} img/s ({v['speedup_vs_eager_best']:.2f}x, "
                          f"median {v['speedup_vs_eager_median']:.2f}x)" for k, v in m["modes"].items())
        cold, warm = m["startup_cold_compile"], m["startup_warm_auto"]
        lines.append(f"{name}: {m['distinct_shapes']} backbone input shapes; {modes}")
        lines.append(f"{name}: compilations during the timed rounds: compile "
                     f"{m['modes']['compile']['compilations_during_rounds']}, unfrozen "
                     f"{m['modes'].get('compile-unfrozen', {}).get('compilations_during_rounds')}, bucket "
                     f"{m['modes']['compile-bucket']['compilations_during_rounds']} "
                     f"(bucket compiled {m['bucket_compilations_total']} graphs in {m['bucket_compile_s']} s)")
        lines.append(f"{name}: start-up compile cold {cold.get('compile_s')} s "
                     f"(cache {cold.get('cache')}), warm {warm.get('compile_s')} s (cache {warm.get('cache')}); "
                     f"auto chose {warm.get('mode')}: {warm.get('reason')}")
    return lines


if __name__ == "__main__":
    main()
