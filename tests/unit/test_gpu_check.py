"""bench/gpu_check.py without a GPU: its judging helpers on made-up inputs,
a missing CUDA stopping it with a clear message, and a CPU smoke run of the
script itself (toy detector: preflight, geometry, raw floor; the served stage,
which starts `serve run`, is left to the bench and was run by hand)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]
CAR = {"bbox": [10, 10, 110, 60], "label": "car"}
PERSON = {"bbox": [200, 20, 240, 120], "label": "person"}


def test_every_object_found_with_its_label_and_nothing_spurious():
    found = [([12, 11, 108, 61], "car", 0.9), ([201, 22, 239, 118], "person", 0.8), ([300, 300, 320, 320], "car", 0.2)]
    result = gc.match_truth(found, [CAR, PERSON])
    assert result["ok"] and result["found"] == 2 and result["min_iou"] > 0.9
    assert result["spurious"] == []  # the 0.2 box is under the score threshold


def test_a_wrong_label_a_missed_object_and_a_spurious_box_fail():
    wrong_label = gc.match_truth([([10, 10, 110, 60], "person", 0.9)], [CAR])
    assert not wrong_label["ok"] and wrong_label["misses"][0]["label"] == "car"
    assert wrong_label["spurious"] == []  # it overlaps an object: a mislabel, not a spurious box
    spurious = gc.match_truth([([10, 10, 110, 60], "car", 0.9), ([300, 300, 350, 350], "person", 0.7)], [CAR])
    assert not spurious["ok"] and spurious["found"] == 1 and len(spurious["spurious"]) == 1
    shifted = gc.match_truth([([60, 10, 160, 60], "car", 0.9)], [CAR])  # IoU 1/3
    assert not shifted["ok"] and shifted["misses"][0]["best_iou"] == pytest.approx(1 / 3, abs=1e-3)
    merged = gc.merge_truth([gc.match_truth([([10, 10, 110, 60], "car", 0.9)], [CAR]), shifted])
    assert merged["objects"] == 2 and merged["found"] == 1 and not merged["ok"]


def test_two_runs_agree_when_boxes_match_and_scores_straddle_the_threshold():
    a = [([10.0, 10.0, 110.0, 60.0], "car", 0.51), ([200.0, 20.0, 240.0, 120.0], "person", 0.3)]
    b = [([10.2, 10.0, 110.0, 60.1], "car", 0.47), ([200.0, 20.0, 240.0, 120.0], "person", 0.31)]
    result = gc.compare_detections(a, b)
    assert result["ok"] and result["pairs"] == 1
    assert result["max_abs_px"] == pytest.approx(0.2, abs=1e-3) and result["max_abs_score"] == pytest.approx(0.04)


def test_two_runs_disagree_on_a_moved_or_relabelled_or_lost_box():
    a = [([10.0, 10.0, 110.0, 60.0], "car", 0.9)]
    assert not gc.compare_detections(a, [([20.0, 10.0, 120.0, 60.0], "car", 0.9)])["ok"]  # IoU 0.82
    assert not gc.compare_detections(a, [([10.0, 10.0, 110.0, 60.0], "person", 0.9)])["ok"]
    lost = gc.compare_detections(a, [([10.0, 10.0, 110.0, 60.0], "car", 0.2)])
    assert not lost["ok"] and lost["unmatched"][0]["only_in"] == "first"
    assert not gc.merge_agreement([gc.compare_detections(a, a), lost])["ok"]


def test_boxes_of_a_detections_and_of_label_studio_regions():
    from mmdet_ls.regions import Detections

    det = Detections(boxes=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), scores=np.array([0.9, 0.1], np.float32),
                     class_names=["car", "person"], width=10, height=10)
    assert gc.boxes_of(det, 0.5) == [([1.0, 2.0, 3.0, 4.0], "car", pytest.approx(0.9))]
    region = {"original_width": 200, "original_height": 100, "score": 0.7,
              "value": {"x": 10, "y": 20, "width": 50, "height": 30, "rectanglelabels": ["Car"]}}
    assert gc.regions_to_boxes([region]) == [([20.0, 20.0, 120.0, 50.0], "Car", 0.7)]


def metrics_text(buckets: dict, count: float, total: float) -> str:
    head = 'ray_mmdet_ls_model_batch_size_{}{{Component="core_worker",deployment="Detector",{}replica="r1"}} {}'
    lines = ["# HELP ray_mmdet_ls_model_batch_size Images per model call in the detector."]
    lines += [head.format("bucket", f'le="{le}",', float(v)) for le, v in buckets.items()]
    lines += [head.format("count", "", float(count)), head.format("sum", "", float(total))]
    lines.append('ray_mmdet_ls_images_total{source="url"} 99.0')
    return "\n".join(lines)


def test_batches_between_two_metrics_readings():
    before = gc.parse_batch_metrics(metrics_text({"1.0": 2, "2.0": 2, "4.0": 2, "+Inf": 2}, 2, 1.0))
    # 32 images: 2 batches of 16, 1 of 0 < n <= 1 (Ray sums bucket midpoints, so _sum is not used)
    after = gc.parse_batch_metrics(metrics_text({"1.0": 3, "2.0": 3, "4.0": 3, "16.0": 5, "+Inf": 5}, 5, 99))
    assert before["count"] == 2 and after["buckets"][float("inf")] == 5
    delta = gc.batch_delta(before, after, images=33)
    assert delta == {"batches": 3, "mean_batch": 11.0, "histogram": {"<=1": 1, "<=16": 2}, "batches_over_1": 2}
    huge = gc.parse_batch_metrics(metrics_text({"1.0": 0, "128.0": 0, "+Inf": 1}, 1, 256))
    assert gc.batch_delta({"count": 0, "buckets": {}}, huge, 300)["histogram"] == {">128": 1}
    assert gc.batch_delta(before, before, 0)["mean_batch"] is None


def test_cpus_the_shipped_configs_reserve():
    gpu = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    detector = next(d for d in gpu["applications"][0]["deployments"] if d["name"] == "Detector")
    assert detector["ray_actor_options"]["num_gpus"] >= 0.25  # the served stage runs this config on the GPU
    assert gc.reserved_cpus(gpu) > gc.reserved_cpus({"applications": [{"deployments": [
        {"name": "Detector", "ray_actor_options": {"num_cpus": 2}}]}]}) == 2
    scaled = {"applications": [{"deployments": [{"autoscaling_config": {"min_replicas": 3},
                                                 "ray_actor_options": {"num_cpus": 0.5}}]}]}
    assert gc.reserved_cpus(scaled) == 1.5


def test_checks_judge_correctness_not_speed():
    results = {"device": "cuda", "preflight": {"notes": []},
               "raw": {"toy": {"rows": [], "stacked_vs_batch1": 0.5}},  # slower batching: recorded, not failed
               "geometry": {"stacked_vs_truth": {"ok": False, "found": 3, "objects": 4, "min_iou": 0.2,
                                                 "spurious": []}},
               "served": {"toy": {"config": "serve_config.gpu.yaml", "ready_s": 30, "detector_device": "cpu",
                                  "predict_n": {"tasks": 32, "batches": 32, "mean_batch": 1.0, "batches_over_1": 0}}}}
    failed = {c["check"] for c in gc.checks_of(results) if not c["ok"]}
    assert failed == {"geometry stacked_vs_truth", "served toy on cuda", "served toy batches formed"}


def test_no_cuda_stops_the_run_with_a_clear_message(tmp_path, monkeypatch):
    import torch

    for key in ("NO_PROXY", "no_proxy"):  # main() adds the loopback to them: restored after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
        if not os.environ[key]:
            monkeypatch.delenv(key)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    (path,) = tmp_path.glob("gpu-check-*-cuda.json")
    result = json.loads(path.read_text())
    assert "sees no CUDA device" in result["preflight"]["error"] and result["passed"] is False


def test_cpu_smoke_run_writes_a_well_formed_result(tmp_path):
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--stages", "raw,geometry",
           "--threads", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-check-*-cpu.json")
    result = json.loads(path.read_text())
    assert result["passed"] is True and result["device"] == "cpu"
    assert result["provenance"]["git"]["commit"] and result["provenance"]["machine"]["cpu_count"]
    assert "CUDA preflight skipped (--device cpu)" in result["preflight"]["notes"]
    assert result["preflight"]["mmcv_nms_on_device"] == "ok"
    rows = result["raw"]["toy"]["rows"]
    assert [(r["batch"], r["stacked"]) for r in rows] == [(1, False), (4, True)]
    assert all(r["images_per_s"] > 0 and r["images"] >= 4 for r in rows)
    assert result["raw"]["toy"]["stacked_vs_batch1"] > 0
    geometry = result["geometry"]
    assert geometry["stacked_vs_truth"]["ok"] and geometry["stacked_vs_truth"]["objects"] >= 3
    assert geometry["single_vs_truth"]["ok"] and geometry["stacked_vs_single"]["ok"]
    assert "skipped" in geometry["device_vs_cpu"]
    assert "served" not in result and "raw b=4 stacked" in run.stdout


@pytest.mark.parametrize("device, shipped", [("cuda", "serve_config.gpu.yaml"), ("cpu", "serve_config.yaml")])
def test_served_stage_runs_the_shipped_config_with_only_host_port_and_allowed_hosts_changed(tmp_path, device, shipped):
    svc = gc.ShippedService(tmp_path, device, {"CONFIG_FILE": "x.py", "DEVICE": device})
    written, original = yaml.safe_load(svc.config.read_text()), yaml.safe_load((ROOT / shipped).read_text())
    assert written["http_options"].pop("host") == "127.0.0.1" and written["http_options"].pop("port") == svc.port
    assert written["applications"][0]["args"].pop("allowed_hosts") == ["127.0.0.1"]
    for config in (written, original):
        config["http_options"].pop("host", None), config["http_options"].pop("port", None)
        config["applications"][0]["args"].pop("allowed_hosts", None)
    assert written == original
    assert svc.url == f"http://127.0.0.1:{svc.port}" and svc.env["CONFIG_FILE"] == "x.py" and svc.proc is None
