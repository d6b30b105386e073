"""The deployment graph in-process on Ray Serve, with a real MMDetection model:
the toy RTMDet trained on synthetic scenes (tests/toy_detector), loaded through
the normal config_file/checkpoint_file path, so regions are real detections.
(Box geometry against ground truth: test_geometry.py.)
"""
import concurrent.futures as cf
import json
import re

import payloads
import pytest
import requests
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import LABEL_CONFIG, LABELS, ls_task
from serve_fixtures import batch_size_histogram, deploy_config, free_port, serve_config_for_test, wait_until
from toy_detector.scenes import scene_png

from mmdet_ls.model_files import model_version

pytestmark = pytest.mark.timeout(900)

SIZES = [(320, 240)] + [(300 + 20 * i, 260 + 10 * i) for i in range(8)]
OPERATOR_KEY = "operator-key-3b9d1f0c7a"


@pytest.fixture(scope="module")
def backend(tmp_path_factory, image_server, ray_serve):
    tmp = tmp_path_factory.mktemp("graph")
    checkpoint = TOY_CHECKPOINT
    image_dir = tmp / "media" / "upload"
    (image_dir / "1").mkdir(parents=True)
    (image_dir / "1" / "c36a2d98-upload1.png").write_bytes(scene_png(500, SIZES[0]))
    http_root = tmp / "http"
    http_root.mkdir()
    for i in range(8):
        (http_root / f"remote{i}.png").write_bytes(scene_png(501 + i, SIZES[1 + i]))
    # The shipped serve_config.yaml, deployed declaratively as `serve deploy` does.
    config = serve_config_for_test(free_port(), {
        "config_file": str(TOY_CONFIG),
        "checkpoint_file": str(checkpoint),
        "image_dir": str(image_dir),
        "allowed_hosts": ["127.0.0.1"],
    })
    images = image_server(http_root)
    # An operator's secrets, in the environment Ray starts with (never args).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
        env.setenv("LABEL_STUDIO_API_KEY", OPERATOR_KEY)
        url = ray_serve(config=config)
        yield {"url": url, "images": images, "checkpoint": checkpoint, "config": config}


def predict(url, tasks, label_config=LABEL_CONFIG, timeout=100):
    """/predict for the project /setup was called for, as Label Studio sends it."""
    return payloads.predict(url, tasks, label_config=label_config, project="1.1795905333", timeout=timeout, params={})


def assert_well_formed(region, width, height):
    assert region["type"] == "rectanglelabels"
    assert (region["from_name"], region["to_name"]) == ("label", "image")
    assert (region["original_width"], region["original_height"]) == (width, height)
    assert region["image_rotation"] == 0 and region["value"]["rotation"] == 0
    v = region["value"]
    assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["width"] > 0 and v["height"] > 0
    assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
    assert len(v["rectanglelabels"]) == 1 and v["rectanglelabels"][0] in LABELS
    assert 0 <= region["score"] <= 1 and re.fullmatch(r"[0-9a-f]{10}", region["id"])


def test_serve_status_and_details_show_the_args_but_no_secret(backend):
    # What `serve status`, `serve config` and the dashboard's Serve page show.
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    shown = repr(serve.status()) + json.dumps(details, default=str)
    app = details["applications"]["mmdet-backend"]
    assert app["deployed_app_config"]["args"]["config_file"] == str(TOY_CONFIG)  # args are on show
    assert OPERATOR_KEY not in shown


def test_health_answers_label_studio_shape(backend):
    body = requests.get(f"{backend['url']}/health", timeout=1).json()
    assert body["status"] == "UP" and body["ready"] is True
    assert body["model_version"] == model_version(str(TOY_CONFIG), str(TOY_CHECKPOINT))
    assert body["model_class"].startswith("MMDetection")
    assert requests.get(f"{backend['url']}/", timeout=1).json()["model_version"] == body["model_version"]


def test_setup_returns_model_version_and_rejects_unusable_config(backend):
    url = backend["url"]
    resp = requests.post(f"{url}/setup", json={
        "project": "1.1795905333", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080",
        "access_token": "secret-token", "extra_params": None}, timeout=3)
    assert resp.status_code == 200
    assert resp.json() == {"model_version": requests.get(f"{url}/health").json()["model_version"]}
    bad = requests.post(f"{url}/setup", json={"project": "2.1", "schema": "<View><Text name='t' value='$t'/></View>"},
                        timeout=3)
    assert bad.status_code == 400 and "no <RectangleLabels>" in bad.json()["error"]
    bad_predict = predict(url, [ls_task(1, "/data/upload/1/c36a2d98-upload1.png")], label_config="<View/>")
    assert bad_predict.status_code == 400 and "no <RectangleLabels>" in bad_predict.json()["error"]


def test_mask_tags_with_a_box_only_model_are_refused_naming_model_and_tag(backend):
    """The toy box model has no mask head: <PolygonLabels>/<BrushLabels> get a
    clear error at /setup (within Label Studio's 3 s: no model is loaded) and
    on /predict, never an empty prediction."""
    url = backend["url"]
    schema = ('<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
              '<Label value="Car" predicted_values="car"/></RectangleLabels><PolygonLabels name="outline" '
              'toName="image"><Label value="Car" predicted_values="car"/></PolygonLabels><BrushLabels name="paint" '
              'toName="image"><Label value="Car" predicted_values="car"/></BrushLabels></View>')
    setup = requests.post(f"{url}/setup", json={"project": "3.1", "schema": schema}, timeout=3)
    assert setup.status_code == 400, setup.text
    for answer in (setup.json()["error"],
                   predict(url, [ls_task(1, "/data/upload/1/c36a2d98-upload1.png")], label_config=schema).json()["error"]):
        assert '<PolygonLabels name="outline">' in answer and '<BrushLabels name="paint">' in answer, answer
        assert "the model rtmdet_toy predicts boxes only" in answer, answer


def test_predict_answers_every_task_in_order_with_errors_per_task(backend):
    url, images = backend["url"], backend["images"]
    tasks = [
        ls_task(11, "/data/upload/1/c36a2d98-upload1.png"),  # image_dir
        ls_task(12, f"{images.url}/remote0.png"),  # HTTP
        ls_task(13, f"{images.url}/does-not-exist.png"),  # broken
        ls_task(14, f"{images.url}/remote1.png"),
        {"id": 15, "data": {"text": "no image key"}},
    ]
    resp = predict(url, tasks)
    assert resp.status_code == 200
    body = resp.json()
    results = body["results"]
    assert len(results) == 5
    version = requests.get(f"{url}/health").json()["model_version"]
    ok = [results[i] for i in (0, 1, 3)]
    for item, (w, h) in zip(ok, [SIZES[0], SIZES[1], SIZES[2]]):
        assert "error" not in item and item["model_version"] == version
        assert item["result"], "every scene has 1-4 objects the toy detector finds"
        for region in item["result"]:
            assert_well_formed(region, w, h)
        assert item["score"] == pytest.approx(sum(r["score"] for r in item["result"]) / len(item["result"]))
    broken = results[2]
    assert "result" not in broken and broken["error_reason"] == "http_404"
    assert broken["error"].endswith("answered HTTP 404") and "does-not-exist.png" in broken["error"]
    assert results[4]["error_reason"] == "bad_task" and '"image"' in results[4]["error"]


def test_batches_larger_than_one_form_under_concurrent_load(backend):
    url, images = backend["url"], backend["images"]
    def one_call(i):
        return predict(url, [ls_task(100 + i * 4 + k, f"{images.url}/remote{(i + k) % 8}.png") for k in range(4)])

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one_call, range(8)))
    assert all(r.status_code == 200 and len(r.json()["results"]) == 4 for r in responses)
    assert all("error" not in item for r in responses for item in r.json()["results"])

    buckets, count = wait_until(lambda: batch_size_histogram(url, min_images=32), 60, 1, "batch size metrics")
    # Cumulative buckets: fewer batches of size <= 1 than batches in all.
    assert buckets[1.0] < count, f"every batch had one image: {buckets}"


def _metric_sum(url, name):
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


def test_metrics_count_tasks_and_failures_by_reason(backend):
    url, images = backend["url"], backend["images"]
    before = _metric_sum(url, 'ray_mmdet_ls_task_failures_total{')
    predict(url, [ls_task(900, f"{images.url}/status/500"), ls_task(901, "ftp://x/y.png")])
    def grew():
        text = requests.get(f"{url}/metrics", timeout=10).text
        return 'reason="http_500"' in text and 'reason="bad_url"' in text and \
            _metric_sum(url, 'ray_mmdet_ls_task_failures_total{') >= before + 2
    wait_until(grew, 30, 1, "failure metrics")
    text = requests.get(f"{url}/metrics", timeout=10).text
    for family in ("ray_mmdet_ls_tasks_total", "ray_mmdet_ls_images_total", "ray_mmdet_ls_stage_seconds_bucket",
                   "ray_mmdet_ls_dropped_detections_total"):
        assert family in text, family


def test_webhook_acknowledges_every_event(backend):
    for action in ("ANNOTATION_CREATED", "PROJECT_UPDATED", "START_TRAINING", None):
        resp = requests.post(f"{backend['url']}/webhook", json={"action": action, "project": {"id": 1}}, timeout=5)
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "ok" and body["handled"] is False and "does not train" in body["detail"]


def test_jobs_api_refuses_when_no_authentication_is_configured(backend):
    # This service has the operator's key but neither basic auth nor JOBS_TOKEN:
    # the jobs API (which writes with that key) stays closed and says why.
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/abc"), ("DELETE", "/jobs/abc")):
        resp = requests.request(method, f"{backend['url']}{path}", json={"project": 1}, timeout=10,
                                headers={"Authorization": "Bearer some-token-0123456789"})
        assert resp.status_code == 403, (method, path, resp.text)
        assert "JOBS_TOKEN" in resp.json()["error"] and "BASIC_AUTH_USER" in resp.json()["error"]


def test_score_threshold_and_batch_settings_change_live_without_reload(backend):
    """An operator edits user_config in the serve config and redeploys: the
    running replicas are reconfigured, the model is not reloaded."""
    import copy

    from ray import serve

    url, images = backend["url"], backend["images"]
    detector = serve.get_deployment_handle("Detector", app_name="mmdet-backend")
    running = serve.status().applications["mmdet-backend"].deployments["Detector"].replica_states["RUNNING"]

    def every_replica() -> dict:
        """replica id -> info(), from calls until every running replica answered
        (the shipped CPU config runs two; calls land on either at random)."""
        seen = {}
        for _ in range(100):
            info = detector.info.remote().result()
            seen[info["replica_id"]] = info
            if len(seen) == running:
                return seen
        raise AssertionError(f"only {len(seen)} of {running} Detector replicas answered")

    before = every_replica()
    tasks = [ls_task(i, f"{images.url}/remote{i}.png") for i in range(8)]

    def redeploy(score_threshold, max_batch_size, batch_wait_timeout_s):
        config = copy.deepcopy(backend["config"])
        for dep in config["applications"][0]["deployments"]:
            if dep["name"] == "Postprocess":
                dep["user_config"] = {"score_threshold": score_threshold}
            if dep["name"] == "Detector":
                dep["user_config"] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        deploy_config(config)
        wait_until(lambda: all(i["max_batch_size"] == max_batch_size for i in every_replica().values()), 60, 0.5,
                   "reconfigure")
        wait_until(lambda: all("error" not in i for i in predict(url, tasks[:1]).json()["results"]), 60, 0.5)

    def regions():
        return [r for item in predict(url, tasks).json()["results"] for r in item["result"]]

    try:
        redeploy(0.05, 8, 0.02)
        loose = regions()
        after = every_replica()
        redeploy(0.9, 2, 0.01)
        strict = regions()
        assert min(r["score"] for r in loose) < 0.9 <= min(r["score"] for r in strict)
        assert len(strict) < len(loose)
        assert {(i["max_batch_size"], i["batch_wait_timeout_s"]) for i in after.values()} == {(8, 0.02)}
        final = every_replica()  # the same replicas, models loaded once
        assert {k: i["loaded_at"] for k, i in final.items()} == {k: i["loaded_at"] for k, i in before.items()}
    finally:
        deploy_config(backend["config"])
