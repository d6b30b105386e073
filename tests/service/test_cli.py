"""The real CLI: `serve run serve_config.yaml` (through scripts/serve.py, the
README's `make serve` path) as a subprocess, with the test checkpoint served
from a slow URL, so /health is seen answering while the model loads."""
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from image_server import ImageServer
from model_fixtures import RTMDET_TINY, save_random_checkpoint
from payloads import predict, task
from PIL import Image
from serve_fixtures import free_port, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def test_serve_run_cli_predicts_and_stops_cleanly(tmp_path):
    (tmp_path / "models").mkdir()
    save_random_checkpoint(RTMDET_TINY, tmp_path / "models" / "rtmdet_tiny.pth")
    with ImageServer(tmp_path / "models", latency_s=15) as slow_models:
        run_cli(tmp_path, f"{slow_models.url}/rtmdet_tiny.pth")
    # Downloaded once into the cache, under a name derived from the URL.
    assert len(list((tmp_path / "cache").glob("*-rtmdet_tiny.pth"))) == 1


def run_cli(tmp_path, checkpoint):
    upload = tmp_path / "media" / "upload" / "1"
    upload.mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(upload / "a.png")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "LABEL_STUDIO_URL": "",
           "MODEL_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "scripts/serve.py", "serve_config.yaml", "--port", str(port),
         "--set", f"config_file={RTMDET_TINY}", "--set", f"checkpoint_file={checkpoint}",
         "--set", f"image_dir={tmp_path / 'media' / 'upload'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    log = io.StringIO()
    try:
        # While the detector downloads and loads its checkpoint, /health
        # already answers within Label Studio's 1 s, and says it is not ready.
        loading = wait_until(lambda: _health_if_up(url), 240, 0.2, "/health to answer")
        assert loading["status"] == "UP" and loading["ready"] is False, loading
        assert loading["model_version"].startswith("rtmdet_tiny_8xb32-300e_coco-") and loading.get("detail")
        try:
            health = wait_ready(url, timeout_s=300)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode(errors="replace")[-5000:]) from None
        assert health["model_version"].startswith("rtmdet_tiny_8xb32-300e_coco-")
        # Its own label config: the COCO model's car and truck as one label.
        label_config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                        '<Label value="Car" predicted_values="car,truck"/></RectangleLabels></View>')
        resp = predict(url, [task(1, "/data/upload/1/a.png"), task(2, "/nope.png")], label_config=label_config)
        assert resp.status_code == 200
        first, second = resp.json()["results"]
        # A random RTMDet finds nothing: an empty, stored prediction.
        assert first == {"result": [], "score": 0.0, "model_version": health["model_version"]}
        assert second["error_reason"] == "no_label_studio_url" and "result" not in second
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        log.write(out.decode(errors="replace"))
    assert proc.returncode is not None
    # Stopped: the port stops answering (Ray's proxy process may outlive the
    # CLI by a moment on a loaded machine).
    wait_until(lambda: _health_if_up(url) is None, 30, 0.5, "the service to stop answering")


def _health_if_up(url):
    try:
        return requests.get(f"{url}/health", timeout=1).json()
    except requests.ConnectionError:
        return None
