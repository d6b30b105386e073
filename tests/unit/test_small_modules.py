"""The small shared pieces the deployments build on: the bounded LRU, basic
auth, the /setup store, the one-line health detail, and the lint."""
import base64
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from payloads import LABEL_CONFIG

from mmdet_ls.basic_auth import basic_auth_ok
from mmdet_ls.health import describe_detector_message
from mmdet_ls.lru import BoundedLRU
from mmdet_ls.projects import Projects, project_key

ROOT = Path(__file__).resolve().parents[2]


def test_lru_drops_the_least_recently_used_and_peek_does_not_count():
    lru = BoundedLRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a use: b is now the oldest
    lru.put("c", 3)
    assert "b" not in lru and len(lru) == 2
    assert lru.peek("a") == 1  # not a use: a stays the oldest
    lru.put("d", 4)
    assert "a" not in lru and {"c", "d"} == {k for k in ("a", "b", "c", "d") if k in lru}
    with pytest.raises(ValueError):
        BoundedLRU(0)


def test_lru_creates_once_under_contention():
    lru, made = BoundedLRU(8), []

    def create():
        made.append(1)
        return object()

    seen = []
    threads = [threading.Thread(target=lambda: seen.append(lru.get_or_create("k", create))) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(v) for v in seen}) == 1


def _basic(user: bytes, password: bytes, scheme: str = "Basic") -> str:
    return f"{scheme} " + base64.b64encode(user + b":" + password).decode()


@pytest.mark.parametrize(
    "header, ok",
    [(_basic(b"u", b"p"), True), (_basic(b"u", b"p", "basic"), True), (_basic(b"u", b"p", "BASIC"), True),
     (_basic(b"u", b"x"), False), (_basic(b"x", b"p"), False), ("Bearer p", False), ("Basic !!!", False),
     (_basic("ü".encode(), b"p"), False), ("", False), ("Basic", False)],
)
def test_basic_auth(header, ok):
    assert basic_auth_ok(header, ("u", "p")) is ok
    assert basic_auth_ok(header, None) is True  # basic auth off


def test_projects_keep_a_bounded_number_of_setups():
    projects = Projects(max_projects=2)
    for i in range(3):
        projects.remember(f"{i}.1795905333", None, LABEL_CONFIG)
    assert projects.label_config("0.999") is None and projects.label_config("2.1") == LABEL_CONFIG
    assert len(projects) == 2 and project_key("12.1795905333") == "12"


def test_health_detail_is_one_fixed_line_whatever_the_traceback_says():
    message = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
               '  File "/home/me/proj/mmdet_ls/model_files.py", line 1, in x\n'
               "mmdet_ls.devices.DeviceError: device 'cuda' needs a GPU (pid=123, actor_id=abc) "
               "http://user:pw@host/x.pth")
    detail, _, _ = describe_detector_message(message, "DEPLOY_FAILED")
    assert detail.startswith("the Detector failed to start (DeviceError): ") and "num_gpus" in detail
    for leak in ("/home", "user:pw", "pid=", "actor_id", "\n"):
        assert leak not in detail


def test_the_code_base_is_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in requirements-dev.txt")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
