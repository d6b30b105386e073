#!/usr/bin/env python
"""How evenly one /predict's images spread over the Detector replicas.

    .venv/bin/python -m bench.routing_balance                 # 20 /predict calls of 24 tasks, 0.5 s per image

The shipped serve_config.yaml (two Detector replicas on the CPU), with a model
that sleeps --per-image-s per image and uses no CPU (bench/slow_app.py), images
from image_dir. Each /predict's wall time in "image times" (seconds /
per-image-s) says how the images were split: with two replicas, an even split
of 24 images takes 12; four groups of six split three and one take 18.
Results: bench/results/routing-<stamp>.json with provenance.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from bench.provenance import provenance, stamp
from bench.serving_bench import ROOT, UPLOAD_SUBDIR, Service
from tests.model_fixtures import RTMDET_TINY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-image-s", type=float, default=0.5)
    p.add_argument("--tasks", type=int, default=24)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    opts = p.parse_args()
    from PIL import Image

    results = {"provenance": provenance(vars(opts))}
    with tempfile.TemporaryDirectory(prefix="routing-") as tmp:
        tmp = Path(tmp)
        images = tmp / "uploads" / UPLOAD_SUBDIR
        images.mkdir(parents=True)
        for i in range(opts.tasks):
            Image.new("RGB", (64, 48), (i * 10 % 256, 0, 0)).save(images / f"i{i}.jpg")
        (tmp / "noop.pth").write_bytes(b"never loaded")
        env = {"CONFIG_FILE": RTMDET_TINY, "CHECKPOINT_FILE": str(tmp / "noop.pth"),
               "IMAGE_DIR": str(tmp / "uploads"), "SLOW_PER_IMAGE_S": str(opts.per_image_s)}
        svc = Service(tmp, env, noop=True)
        svc.config.write_text(svc.config_text.replace("bench.noop_app:build_app", "bench.slow_app:build_app"))
        svc.config_text = svc.config.read_text()
        results["serve_config_yaml"] = svc.config_text
        urls = [f"/data/upload/{UPLOAD_SUBDIR}/i{i}.jpg" for i in range(opts.tasks)]
        with svc:
            svc.predict(urls[:2])  # warm the graph
            times = []
            for r in range(opts.rounds):
                times.append(round(svc.predict(urls) / opts.per_image_s, 1))
                print(f"round {r + 1}/{opts.rounds}: {times[-1]} image times", flush=True)
            errors = svc.errors
    even = opts.tasks / 2
    results.update(image_times=times, error_items=errors, even_split_image_times=even,
                   histogram={str(k): v for k, v in sorted(collections.Counter(round(t) for t in times).items())},
                   uneven_rounds=sum(t > even * 1.2 for t in times))
    summary = (f"{opts.rounds} /predict of {opts.tasks}: even split = {even:g} image times; "
               f"histogram {results['histogram']}; {results['uneven_rounds']} rounds over 1.2x even; "
               f"{errors} error items")
    results["summary"] = summary
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"routing-{stamp()}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
