"""Two models on one Ray cluster: serve_config.multi.yaml, two applications at
two route prefixes, each a Label Studio model URL of its own (protocol end to end)."""
import shutil

import pytest
import requests
import yaml
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import LABEL_CONFIG, task
from serve_fixtures import ROOT, deploy_config, free_port, wait_ready
from toy_detector.scenes import scene_png

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, image_server, ray_serve):
    tmp = tmp_path_factory.mktemp("multi")
    # Two different checkpoints of the toy detector stand in for the two zoo models.
    second = tmp / "toy_copy.pth"
    shutil.copy(TOY_CHECKPOINT, second)
    with open(second, "ab") as f:
        f.write(b"\0")  # other bytes, so another model_version
    config = yaml.safe_load((ROOT / "serve_config.multi.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    checkpoints = {"frcnn": str(TOY_CHECKPOINT), "rtmdet": str(second)}
    for app in config["applications"]:
        app["args"].update(config_file=str(TOY_CONFIG), checkpoint_file=checkpoints[app["name"]],
                           allowed_hosts=["127.0.0.1"])
    web = tmp / "web"
    web.mkdir()
    (web / "scene.png").write_bytes(scene_png(900))
    images = image_server(web)
    url = ray_serve(config=config, wait=False)  # nothing at the root: each app has its own prefix
    for app in config["applications"]:
        deploy_config(config, app_name=app["name"])
    return {"url": url, "images": images}


def test_each_application_is_its_own_label_studio_model_url(two_models):
    url, images = two_models["url"], two_models["images"]
    versions = {}
    for prefix in ("frcnn", "rtmdet"):
        model_url = f"{url}/{prefix}"  # what the user pastes into Label Studio
        health = wait_ready(model_url)
        assert health["status"] == "UP"
        setup = requests.post(f"{model_url}/setup", json={"project": "1.1", "schema": LABEL_CONFIG}, timeout=10)
        assert setup.json() == {"model_version": health["model_version"]}
        resp = requests.post(f"{model_url}/predict", timeout=100, json={
            "tasks": [task(1, f"{images.url}/scene.png")], "project": "1.1"})
        assert resp.status_code == 200, (prefix, resp.status_code, resp.text[:500])
        (item,) = resp.json()["results"]
        assert item["model_version"] == health["model_version"] and item["result"], item
        versions[prefix] = (health["model_version"], min(r["score"] for r in item["result"]))
    assert versions["frcnn"][0] != versions["rtmdet"][0], versions
    assert versions["rtmdet"][1] >= 0.4  # its own live threshold
    assert requests.get(f"{url}/health", timeout=5).status_code == 404  # nothing at the root
