"""Box geometry and label truth through the running graph (/setup then
/predict), with the trained toy detector and synthetic scenes whose boxes are
known exactly."""
import io

import pytest
import requests
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import task
from PIL import Image
from toy_detector.scenes import make_scene

from serve_app import AppArgs, build_app

pytestmark = pytest.mark.timeout(900)

# Its own label config on purpose: two detector classes squashed into one label
# ("car, airplane", with a space), one mapped 1:1 to a label of another name.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Vehicle" predicted_values="car, airplane"/>'
    '<Label value="Human" predicted_values="person"/>'
    "</RectangleLabels></View>"
)
TO_LABEL = {"car": "Vehicle", "airplane": "Vehicle", "person": "Human"}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(display: Image.Image) -> bytes:
    """JPEG whose stored pixels are rotated; EXIF orientation 6 (rotate 90
    clockwise to display) brings back `display`."""
    stored = display.transpose(Image.Transpose.ROTATE_90)  # 90 counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif)


def rgba(img: Image.Image) -> Image.Image:
    out = img.convert("RGBA")
    out.putalpha(255)
    return out


# name -> (seed, size, how the displayed scene is stored)
CASES = {
    "plain_jpeg": (7001, (384, 288), lambda im: encode(im, "JPEG", quality=92)),
    "exif_rotated_jpeg": (7002, (300, 400), exif_rotated_jpeg),
    "grayscale_png": (7003, (352, 320), lambda im: encode(im.convert("L"), "PNG")),
    "rgba_png": (7004, (320, 352), lambda im: encode(rgba(im), "PNG")),
    "large_non_square": (7005, (2000, 900), lambda im: encode(im, "JPEG", quality=92)),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, image_server, ray_serve):
    root = tmp_path_factory.mktemp("geometry")
    truth = {}
    for name, (seed, size, store) in CASES.items():
        image, objects = make_scene(seed, *size)
        (root / f"{name}.img").write_bytes(store(image))
        truth[name] = (size, objects)
    args = AppArgs(config_file=str(TOY_CONFIG), checkpoint_file=str(TOY_CHECKPOINT),
                   image_dir=str(root / "uploads"), allowed_hosts=["127.0.0.1"])
    images = image_server(root)
    url = ray_serve(build_app(args))
    return url, images, truth


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_every_object_found_with_right_label_and_geometry(service):
    url, images, truth = service
    setup = requests.post(f"{url}/setup", timeout=3, json={
        "project": "7.1", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080", "access_token": "x"})
    assert setup.status_code == 200
    names = list(CASES)
    tasks = [task(i, f"{images.url}/{name}.img") for i, name in enumerate(names)]
    # No label_config in the body: the one from /setup for this project is used.
    resp = requests.post(f"{url}/predict", json={"tasks": tasks, "project": "7.1"}, timeout=100)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == len(names)
    for name, item in zip(names, results):
        (width, height), objects = truth[name]
        assert "error" not in item, (name, item)
        regions = item["result"]
        for r in regions:
            assert (r["original_width"], r["original_height"]) == (width, height), name
            v = r["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100 + 1e-6
            assert v["y"] + v["height"] <= 100 + 1e-6
            assert v["rectanglelabels"][0] in ("Vehicle", "Human")
        boxes = [((r["value"]["x"], r["value"]["y"], r["value"]["x"] + r["value"]["width"],
                   r["value"]["y"] + r["value"]["height"]), r["value"]["rectanglelabels"][0]) for r in regions]
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            gt = (100 * x1 / width, 100 * y1 / height, 100 * x2 / width, 100 * y2 / height)
            best = max((iou(gt, b) for b, label in boxes if label == TO_LABEL[obj["label"]]), default=0.0)
            assert best >= 0.8, f"{name}: {obj['label']} at {obj['bbox']} best IoU {best:.2f}; regions {boxes}"
        # No spurious boxes either: every region matches some object.
        for box, label in boxes:
            assert any(iou(box, (100 * o["bbox"][0] / width, 100 * o["bbox"][1] / height,
                                 100 * o["bbox"][2] / width, 100 * o["bbox"][3] / height)) >= 0.5
                       for o in objects), f"{name}: spurious region {box} {label}"
