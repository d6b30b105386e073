"""The real CLI: `serve run serve_config.yaml` (through scripts/serve.py, the
README's `make serve` path) as a subprocess, with the test checkpoint."""
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from model_fixtures import RTMDET_TINY, save_random_checkpoint
from serve_fixtures import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def test_serve_run_cli_predicts_and_stops_cleanly(tmp_path):
    checkpoint = save_random_checkpoint(RTMDET_TINY, tmp_path / "rtmdet_tiny.pth")
    upload = tmp_path / "media" / "upload" / "1"
    upload.mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(upload / "a.png")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "LABEL_STUDIO_URL": ""}
    proc = subprocess.Popen(
        [sys.executable, "scripts/serve.py", "serve_config.yaml", "--port", str(port),
         "--set", f"config_file={RTMDET_TINY}", "--set", f"checkpoint_file={checkpoint}",
         "--set", f"image_dir={tmp_path / 'media' / 'upload'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    log = io.StringIO()
    try:
        try:
            health = wait_ready(url, timeout_s=300)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode(errors="replace")[-5000:])
        assert health["model_version"].startswith("rtmdet_tiny_8xb32-300e_coco-")
        label_config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                        '<Label value="Car" predicted_values="car,truck"/></RectangleLabels></View>')
        resp = requests.post(f"{url}/predict", timeout=100, json={
            "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}, {"id": 2, "data": {"image": "/nope.png"}}],
            "project": "1.1", "label_config": label_config})
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
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=2)
