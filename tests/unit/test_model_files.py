import hashlib

import pytest

from mmdet_ls.devices import DeviceError, parse_device, replica_device
from mmdet_ls.model_files import (
    ModelFileError,
    model_version,
    resolve_checkpoint_file,
    resolve_config_file,
)


@pytest.mark.parametrize(
    "given, expected",
    [("cpu", "cpu"), ("auto", "auto"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("gpu:0", "cuda:0"),
     ("GPU:2", "cuda:2"), (" cpu ", "cpu")],
)
def test_device_names(given, expected):
    assert parse_device(given) == expected


def test_bad_device_name():
    with pytest.raises(DeviceError, match="cuda:N"):
        parse_device("tpu")


def test_outside_ray_the_process_owns_the_gpus_it_sees(monkeypatch):
    """bench/ and tests build BatchDetector outside Ray: the visible CUDA
    devices count as reserved there; with none, explicit cuda refuses."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert replica_device("auto") == "cuda:0" and replica_device("gpu:3") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # same on machines with a GPU
    assert replica_device("auto") == "cpu" and replica_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="num_gpus"):
        replica_device("cuda")


def test_config_names_shipped_with_mmdet_resolve(tmp_path):
    path = resolve_config_file("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py")
    assert path.endswith("faster-rcnn_r50_fpn_1x_coco.py")
    assert resolve_config_file("mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py").endswith(".py")
    own = tmp_path / "mine.py"
    own.write_text("x = 1")
    assert resolve_config_file(str(own)) == str(own.resolve())
    with pytest.raises(ModelFileError, match="neither a file nor a config shipped"):
        resolve_config_file("nope/nope.py")


def test_model_version_tracks_checkpoint_content(tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights-1")
    v1 = model_version("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", str(ckpt))
    assert v1 == "faster-rcnn_r50_fpn_1x_coco-" + hashlib.sha256(b"weights-1").hexdigest()[:12]
    assert model_version("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", str(ckpt)) == v1  # stable
    ckpt.write_bytes(b"weights-2")
    assert model_version("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", str(ckpt)) != v1


def test_unreachable_checkpoint_url_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelFileError) as err:
        resolve_checkpoint_file("http://127.0.0.1:9/faster_rcnn.pth", timeout_s=2)
    message = str(err.value)
    assert "set checkpoint_file to its local path" in message
    assert "~/.cache/mmdet-ls-backend/checkpoints" in message and str(tmp_path) not in message
    assert list((tmp_path / ".cache" / "mmdet-ls-backend" / "checkpoints").iterdir()) == []


def test_cached_checkpoint_url_is_not_downloaded_again(tmp_path, monkeypatch):
    import zipfile

    from mmdet_ls.model_files import cached_checkpoint_path

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    url = "http://127.0.0.1:9/model.pth"  # nothing listens there
    with zipfile.ZipFile(cached_checkpoint_path(url), "w") as zf:  # torch.save's format
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert resolve_checkpoint_file(url) == str(cached_checkpoint_path(url))


def test_cache_file_name_is_safe_and_free_of_secrets(tmp_path, monkeypatch):
    from mmdet_ls.model_files import cached_checkpoint_path

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    path = cached_checkpoint_path("https://ann:s3cret@example.com/a/%2e%2e%2Fx%20y.pth?sig=abc")
    assert path.parent == tmp_path
    assert "s3cret" not in path.name and "sig" not in path.name and "/" not in path.name
    assert path.name.endswith("x_y.pth")
    with pytest.raises(ModelFileError, match="not a usable URL"):
        cached_checkpoint_path("http://a@b@example.com/x.pth")


def test_local_checkpoint_is_checked_against_a_configured_digest(tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert resolve_checkpoint_file(str(ckpt), checkpoint_sha256=digest) == str(ckpt.resolve())
    with pytest.raises(ModelFileError, match="checkpoint_sha256"):
        resolve_checkpoint_file(str(ckpt), checkpoint_sha256=hashlib.sha256(b"other").hexdigest())


def test_missing_checkpoint_path():
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_checkpoint_file("/nonexistent/model.pth")
