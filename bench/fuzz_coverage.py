#!/usr/bin/env python
"""Run tests/service/test_fuzz.py once and record what it covered.

    .venv/bin/python -m bench.fuzz_coverage        # writes bench/results/fuzz-coverage-<UTC time>.json

(from the repository root, like every bench script). Runs pytest on
tests/service/test_fuzz.py (its own local Ray and Serve app, as in CI)
with MMDET_LS_FUZZ_COVERAGE set, so each fuzz test writes its counts: bodies
sent, HTTP statuses, for /predict the bodies that reached the task level (a
200 with at least one per-task item) and the outcome of every task item
(`predicted` or its `error_reason`). The result file adds the pytest exit
code, the wall time and the provenance (commit, arguments, machine).
hypothesis runs with derandomize=True, so every run draws the same bodies;
only outcomes that depend on timing can differ between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import provenance, stamp

ROOT = Path(__file__).resolve().parent.parent
FUZZ_TESTS = "tests/service/test_fuzz.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="result file (default: bench/results/fuzz-coverage-<UTC time>.json)")
    parser.add_argument("-k", default=None, help="pytest -k expression (default: the whole file)")
    args = parser.parse_args()
    out = Path(args.json or ROOT / "bench" / "results" / f"fuzz-coverage-{stamp()}.json")
    run_info = provenance({"tests": FUZZ_TESTS, "k": args.k})

    with tempfile.TemporaryDirectory(prefix="fuzz-coverage-") as tmp:
        counts = Path(tmp) / "coverage.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", FUZZ_TESTS]
        if args.k:
            cmd += ["-k", args.k]
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MMDET_LS_FUZZ_COVERAGE": str(counts)})
        wall_s = time.monotonic() - started
        coverage = json.loads(counts.read_text()) if counts.is_file() else {}

    predict = coverage.get("predict")
    summary = None
    if predict:
        items = sum(predict["task_items"].values())
        summary = {
            "predict_bodies": predict["bodies"],
            "predict_bodies_reaching_task_level": predict["bodies_reaching_task_level"],
            "predict_share_reaching_task_level": round(predict["bodies_reaching_task_level"] / predict["bodies"], 3),
            "task_items": items,
            "task_outcomes": sorted(predict["task_items"]),
        }
    result = {"provenance": run_info, "pytest_exit_code": proc.returncode, "wall_s": round(wall_s, 1),
              "summary": summary, "coverage": coverage}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"result written to {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
