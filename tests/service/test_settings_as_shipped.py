"""Every documented setting, set each documented way, on the SHIPPED serve_config.yaml.

One `serve run` (a subprocess, as `make serve` starts it) per way of setting,
all parameters at once, each checked by behaviour in the running service:
* SET=: `scripts/serve.py serve_config.yaml --set k=v ...` (what `make serve SET="..."` runs);
* YAML: a copy of serve_config.yaml edited where docs/configuration.md says
  (args; live settings in their deployment's user_config), with the
  environment set to OTHER values, which must lose (explicit > environment);
* environment: CONFIG_FILE, CHECKPOINT_FILE, DEVICE, IMAGE_DIR,
  LABEL_STUDIO_URL, SCORE_THRESHOLD, BASIC_AUTH_USER, MODEL_DIR, LOG_LEVEL.
Secrets are environment-only in every way: LABEL_STUDIO_API_KEY, BASIC_AUTH_PASS.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import predict, task
from serve_fixtures import batch_size_histogram, free_port, wait_ready, wait_until
from toy_detector.scenes import scene_png

from mmdet_ls.model_files import model_version

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

API_KEY = "settings-test-key-5f1c"
USER, PASSWORD = "labeler", "settings-pass-8d2e"
AUTH = (USER, PASSWORD)
SCENES = 8
# Per way: (score_threshold, max_batch_size or None for the CPU default 4). Each
# threshold is above the default 0.5 and above some of the toy detector's
# scores on these scenes, so a threshold silently ignored leaves a region below it.
WAYS = {"set": (0.85, 2), "yaml": (0.9, 3), "env": (0.95, None)}
DEFAULT_BATCH = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, image_server):
    tmp = tmp_path_factory.mktemp("settings")
    models = tmp / "models"
    models.mkdir()
    (models / "toy.pth").write_bytes(TOY_CHECKPOINT.read_bytes())
    web = tmp / "web"
    web.mkdir()
    for i in range(SCENES):
        (web / f"scene{i}.png").write_bytes(scene_png(800 + i))
    ls_root = tmp / "ls"  # a stand-in Label Studio serving one upload
    (ls_root / "data" / "upload" / "9").mkdir(parents=True)
    (ls_root / "data" / "upload" / "9" / "only-on-ls.png").write_bytes(scene_png(820))
    model_server, images, ls = image_server(models), image_server(web), image_server(ls_root)
    return {"tmp": tmp, "models": model_server, "images": images, "ls": ls,
            "checkpoint_url": f"{model_server.url}/toy.pth"}


def image_dir_with(tmp: Path, name: str) -> Path:
    """An image_dir holding one upload that exists nowhere else."""
    root = tmp / f"upload-{name}"
    (root / "3").mkdir(parents=True, exist_ok=True)
    (root / "3" / f"only-in-{name}.png").write_bytes(scene_png(830 + len(name)))
    return root


def start(world, way: str, argv: list[str], env: dict[str, str], port: int):
    model_dir = world["tmp"] / f"model-dir-{way}"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "BASIC_AUTH"))}
    env = {**base_env, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "LABEL_STUDIO_API_KEY": API_KEY,
           "BASIC_AUTH_PASS": PASSWORD, "MODEL_DIR": str(model_dir), **env}
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", model_dir


def stop(proc) -> str:
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out.decode(errors="replace")


def check_service(world, url, model_dir, image_dir: Path, name: str, threshold: float, batch: int) -> dict:
    health = wait_ready(url, timeout_s=300)
    # config_file + checkpoint_file (a URL, cached under MODEL_DIR)
    assert health["model_version"] == model_version(str(TOY_CONFIG), world["checkpoint_url"])
    assert list(model_dir.glob("*toy.pth")), f"checkpoint not cached in MODEL_DIR {model_dir}"
    # basic_auth_user + BASIC_AUTH_PASS
    assert predict(url, [], auth=None).status_code == 401
    # image_dir: a file only there; label_studio_url (+ the key from the environment): a file only there
    resp = predict(url, [task(1, f"/data/upload/3/only-in-{name}.png"), task(2, "/data/upload/9/only-on-ls.png")],
                   auth=AUTH)
    local, remote = resp.json()["results"]
    assert "result" in local and "error" not in local, local  # found: else an error item (not_found, ...)
    assert "result" in remote and "error" not in remote, remote
    assert any(p == "/data/upload/9/only-on-ls.png" and h.get("Authorization") == f"Token {API_KEY}"
               for p, h in world["ls"].requests)
    # score_threshold (the live Postprocess setting): no region below it
    images = world["images"].url
    def one_call(i):  # 8 calls of 4 tasks at once: images queue at the Detector, so batches form
        return predict(url, [task(10 + 4 * i + k, f"{images}/scene{(i + k) % SCENES}.png") for k in range(4)],
                       auth=AUTH)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one_call, range(8)))
    regions = [r for a in answers for item in a.json()["results"] for r in item["result"]]
    assert all(r["score"] >= threshold for r in regions), sorted(r["score"] for r in regions)[:5]
    # max_batch_size (the live Detector setting): batches formed, none above it
    buckets, count = wait_until(lambda: batch_size_histogram(url, AUTH, min_images=34), 60, 1, "batch size metrics")
    assert all(n == count for le, n in buckets.items() if le >= batch), (batch, buckets)
    assert buckets[1.0] < count, f"no batch above one image: {buckets}"
    return {"regions": len(regions)}


def run_way(world, way, argv, env, port, image_dir, threshold, batch) -> tuple[dict, str]:
    """One `serve run` set up one way: (what check_service saw, its output)."""
    proc, url, model_dir = start(world, way, argv, env, port)
    try:
        return check_service(world, url, model_dir, image_dir, way, threshold, batch), stop(proc)
    except BaseException:
        stop(proc)
        raise


def test_every_setting_each_way_on_the_shipped_config(world):
    outcomes, logs = {}, {}
    common = {"config_file": str(TOY_CONFIG), "checkpoint_file": world["checkpoint_url"], "device": "cpu",
              "label_studio_url": world["ls"].url, "basic_auth_user": USER, "allowed_hosts": ["127.0.0.1"]}

    # 1. SET= (make serve SET="...")
    threshold, batch = WAYS["set"]
    port = free_port()
    image_dir = image_dir_with(world["tmp"], "set")
    # model_acceleration=auto, the shipped default (the suite runs services eager): it measures and
    # maybe compiles before the Detector reports ready.
    sets = {**common, "image_dir": str(image_dir), "score_threshold": threshold, "max_batch_size": batch,
            "log_level": "DEBUG", "model_acceleration": "auto"}
    argv = ["serve_config.yaml", "--port", str(port)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    outcomes["set"], logs["set"] = run_way(world, "set", argv, {}, port, image_dir, threshold, batch)

    # 2. The YAML, edited where each setting lives; the environment says otherwise and loses.
    threshold, batch = WAYS["yaml"]
    port = free_port()
    image_dir = image_dir_with(world["tmp"], "yaml")
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(common, image_dir=str(image_dir), model_acceleration="channels_last")
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Postprocess"]["user_config"] = {"score_threshold": threshold}
    deployments["Detector"]["user_config"] = {"max_batch_size": batch, "batch_wait_timeout_s": 0.0}
    path = world["tmp"] / "serve_config.edited.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    losing_env = {"SCORE_THRESHOLD": "0.05", "IMAGE_DIR": str(image_dir_with(world["tmp"], "env-loses")),
                  "CONFIG_FILE": "no/such/config.py", "DEVICE": "cuda", "MODEL_ACCELERATION": "compile"}
    outcomes["yaml"], logs["yaml"] = run_way(world, "yaml", [str(path)], losing_env, port, image_dir, threshold, batch)

    # 3. The environment, on the shipped file untouched.
    threshold, _ = WAYS["env"]
    port = free_port()
    image_dir = image_dir_with(world["tmp"], "env")
    env = {"CONFIG_FILE": str(TOY_CONFIG), "CHECKPOINT_FILE": world["checkpoint_url"], "DEVICE": "cpu",
           "IMAGE_DIR": str(image_dir), "LABEL_STUDIO_URL": world["ls"].url, "SCORE_THRESHOLD": str(threshold),
           "BASIC_AUTH_USER": USER, "LOG_LEVEL": "WARNING"}
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    shipped["http_options"]["port"] = port
    shipped["applications"][0]["args"]["allowed_hosts"] = ["127.0.0.1"]  # the test's image server
    path = world["tmp"] / "serve_config.port.yaml"
    path.write_text(yaml.safe_dump(shipped, sort_keys=False))
    outcomes["env"], logs["env"] = run_way(world, "env", [str(path)], env, port, image_dir, threshold, DEFAULT_BATCH)

    # The thresholds really differed: a lower one kept more regions.
    counts = [outcomes[way]["regions"] for way in ("set", "yaml", "env")]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] > 0, outcomes
    # log_level / LOG_LEVEL: DEBUG shows the ingress's per-call line, WARNING hides even INFO.
    assert "predict: " in logs["set"], logs["set"][-3000:]
    assert "Detector ready" not in logs["env"] and "predict: " not in logs["env"]
    # model_acceleration: auto measured at start-up and said what it chose; the YAML's arg beat the environment.
    assert re.search(r"Detector ready .*acceleration: (channels_last|compile|eager): .*measured", logs["set"]), \
        logs["set"][-3000:]
    assert "acceleration: channels_last: channels_last asked for" in logs["yaml"], logs["yaml"][-3000:]
