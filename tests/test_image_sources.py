import io
import os

import pytest
import requests
from PIL import Image

from mmdet_ls.failures import TaskError
from mmdet_ls.image_sources import FetchLimits, fetch_image_bytes
from mmdet_ls.network_policy import NetworkPolicy, classify_address

from image_server import ImageServer

LOOPBACK_OK = NetworkPolicy(allowed_hosts=("127.0.0.1",))


def png_bytes(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def upload_dir(tmp_path):
    root = tmp_path / "media" / "upload"
    (root / "3").mkdir(parents=True)
    (root / "3" / "abc-photo.png").write_bytes(png_bytes())
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", root / "3" / "link.png")
    return root


def fetch(value, image_dir, limits=FetchLimits(), policy=LOOPBACK_OK, **kw):
    with requests.Session() as session:
        return fetch_image_bytes(value, image_dir=str(image_dir), session=session, limits=limits, policy=policy, **kw)


def test_upload_read_from_image_dir(upload_dir):
    got = fetch("/data/upload/3/abc-photo.png", upload_dir)
    assert got.source == "local" and got.data == png_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/../../secret.txt",
        "/data/upload/3/..%2F..%2Fsecret.txt",
        "/data/upload/%2e%2e/%2e%2e/secret.txt",
        "/data/upload//etc/passwd",
        "/data/upload/3/link.png",  # symlink out of image_dir
    ],
)
def test_paths_leaving_image_dir_are_refused(upload_dir, path):
    with pytest.raises(TaskError) as err:
        fetch(path, upload_dir)
    assert err.value.failure.reason == "forbidden_path"


def test_relative_path_without_label_studio_url_says_what_to_set(upload_dir):
    with pytest.raises(TaskError, match="set LABEL_STUDIO_URL"):
        fetch("/data/upload/3/missing.png", upload_dir)


def test_unknown_schemes_refused(upload_dir):
    for url in ("ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/"):
        with pytest.raises(TaskError) as err:
            fetch(url, upload_dir)
        assert err.value.failure.reason == "bad_url"


def test_http_fetch_and_failures(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    limits = FetchLimits(connect_timeout_s=1, read_timeout_s=1, total_timeout_s=2, max_bytes=1_000_000, max_redirects=3)
    with ImageServer(tmp_path) as srv:
        assert fetch(f"{srv.url}/a.png", upload_dir, limits).data == png_bytes()
        cases = {
            "/status/404": "http_404",
            "/status/500": "http_500",
            "/redirect-loop": "redirect_loop",
            "/trickle": "timeout",
            "/endless": "too_large",
            "/huge-declared": "too_large",
        }
        for path, reason in cases.items():
            with pytest.raises(TaskError) as err:
                fetch(srv.url + path, upload_dir, limits)
            assert err.value.failure.reason == reason, path


def test_label_studio_credentials_only_go_to_label_studio(tmp_path, upload_dir):
    from mmdet_ls.image_sources import LabelStudioAuth

    (tmp_path / "upload" / "3").mkdir(parents=True)
    (tmp_path / "upload" / "3" / "x.png").write_bytes(png_bytes())
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as ls, ImageServer(tmp_path, host="127.0.0.3") as other:
        with requests.Session() as s:
            auth = LabelStudioAuth(ls.url, "0123456789abcdef", s, FetchLimits())
            got = fetch("/upload/3/x.png", upload_dir, label_studio_url=ls.url, auth=auth,
                        policy=NetworkPolicy(allowed_hosts=("127.0.0.3",)))
            assert got.source == "label_studio"
            assert ls.requests[-1][1]["Authorization"] == "Token 0123456789abcdef"
            fetch(f"{other.url}/a.png", upload_dir, label_studio_url=ls.url, auth=auth,
                  policy=NetworkPolicy(allowed_hosts=("127.0.0.3",)))
            assert "Authorization" not in other.requests[-1][1]


def test_blocked_loopback_address_is_refused(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path, host="127.0.0.2") as srv:
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/a.png", upload_dir, policy=NetworkPolicy(allowed_hosts=("127.0.0.1",)))
        assert err.value.failure.reason == "forbidden_address"
        assert "allow_private_networks" in err.value.failure.message
        assert srv.requests == []  # refused before connecting


def test_redirect_to_forbidden_address_is_refused(tmp_path, upload_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with ImageServer(tmp_path) as srv:
        with pytest.raises(TaskError) as err:
            fetch(f"{srv.url}/redirect-to/http://169.254.169.254/latest/meta-data", upload_dir)
        assert err.value.failure.reason == "forbidden_address"


@pytest.mark.parametrize(
    "ip, kind",
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("0.0.0.0", "unroutable"),
        ("8.8.8.8", "public"),
        ("2606:4700::1111", "public"),
    ],
)
def test_address_classification(ip, kind):
    assert classify_address(ip) == kind


def test_policy_switches():
    NetworkPolicy(allow_private_networks=True).check_address("nas", "192.168.1.5")
    with pytest.raises(TaskError):
        NetworkPolicy(allow_private_networks=True).check_address("meta", "169.254.169.254")
    NetworkPolicy(allowed_hosts=("169.254.0.0/16",)).check_address("meta", "169.254.169.254")
    with pytest.raises(TaskError):
        NetworkPolicy().check_address("nas", "10.0.0.1")
    NetworkPolicy().check_address("nas", "10.0.0.1", trusted_host=True)  # the Label Studio host
