"""Every region mmdet_ls emits for edge-case masks passes Label Studio's own strict
prediction validation.

With `fflag_feat_utc_210_prediction_validation_15082025` on, one invalid region makes
Label Studio reject the whole /predict batch (docs/labelstudio-notes.md, 4d). The server
path is ml/models.py `MLBackend.predict_tasks` -> `PredictionSerializer(data=predictions,
many=True).is_valid()` -> `PredictionSerializer.validate` (label_studio/tasks/serializers.py)
-> `LabelInterface(project.label_config).validate_prediction(data, return_errors=True)`.
VALIDATE below makes that same call, in Label Studio 1.23.2's own virtualenv, on what DRF
hands `validate()`: the item's `result` as parsed from JSON, `score` as a float,
`model_version` as a string.

The masks: tiny (one pixel), thin (1-px lines, diagonals, a 2x2 checker), edge- and
corner-touching, the full image, rings, more pieces than MAX_PIECES, a crumb, noise,
empty (as a model gives after its mask threshold) and the toy scenes' real masks, on
images from 7x5 to 2000x900, for several MaskStyles; plus boxes partly outside the image.
Negative controls (an emitted region made invalid) must be rejected by the same call,
so the test cannot pass because the validator was called wrongly.
"""
from __future__ import annotations

import copy
import json
import subprocess
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
from labelstudio_server import ensure_installed
from toy_detector.scenes import make_scene_with_masks

from mmdet_ls.brush_rle import brush_rle_to_mask
from mmdet_ls.label_config import parse_label_config
from mmdet_ls.masks import MAX_PIECES, MAX_POINTS_LIMIT, crop_full_mask, is_valid_polygon
from mmdet_ls.regions import Detections, ImageResult, MaskStyle, image_result
from mmdet_ls.tasks import prediction_item

LABELS = ('<Label value="Car" predicted_values="car,truck"/><Label value="Plane" predicted_values="airplane"/>'
          '<Label value="Person" predicted_values="person"/>')
CONFIG = ('<View><Image name="image" value="$image"/>'
          f'<RectangleLabels name="box" toName="image">{LABELS}</RectangleLabels>'
          f'<PolygonLabels name="outline" toName="image">{LABELS}</PolygonLabels>'
          f'<BrushLabels name="paint" toName="image">{LABELS}</BrushLabels>'
          '</View>')
TARGETS = parse_label_config(CONFIG).targets
N_MASK_TARGETS = sum(t.needs_masks for t in TARGETS)
CLASSES = ("car", "truck", "person", "airplane")  # all map through predicted_values
SCORES = (0.9, 0.5, 1.0, 0.63)  # 0.5: exactly the threshold (kept)
THRESHOLD = 0.5
SIZES = ((7, 5), (64, 48), (640, 480), (2000, 900))  # width, height
STYLES = {"default": MaskStyle(), "max_points_3": MaskStyle(max_points=3), "tolerance_5": MaskStyle(tolerance_px=5.0),
          "finest": MaskStyle(tolerance_px=0.0, max_points=MAX_POINTS_LIMIT)}
SCENES = ((0, 640, 480), (1, 640, 480), (2, 2000, 900), (3, None, None), (4, None, None))


def edge_cases(w: int, h: int) -> dict[str, np.ndarray]:
    """Name -> bool (h, w) mask; every one but "empty" has a pixel."""
    def blank():
        return np.zeros((h, w), bool)

    def pixels(*yx):
        out = blank()
        for y, x in yx:
            out[y, x] = True
        return out

    def block(y0, y1, x0, x1):
        out = blank()
        out[y0:y1, x0:x1] = True
        return out

    rng = np.random.default_rng(w * 10_000 + h)
    cy, cx, n = h // 2, w // 2, min(h, w)
    k = max(1, n // 8)  # side of edge/corner blocks
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(yy + 0.5 - h / 2, xx + 0.5 - w / 2)

    frame = np.ones((h, w), bool)
    frame[1:-1, 1:-1] = False
    checker = blank()
    ch, cw = min(h, 64), min(w, 64)
    checker[:ch, :cw] = ((yy[:ch, :cw] + xx[:ch, :cw]) % 2) == 0  # 1-px checkerboard from the top-left corner
    pieces = blank()
    step = max(2, n // 4)
    for y in range(0, h, step):
        for x in range(0, w, step):
            pieces[y:y + max(1, step // 2), x:x + max(1, step // 2)] = True
    crumb = block(h // 4, max(h // 4 + 1, 3 * h // 4), w // 4, max(w // 4 + 1, 3 * w // 4))
    crumb[h - 1, w - 1] = True
    noise = blank()
    nh, nw = min(h, 160), min(w, 160)
    noise[h - nh:, w - nw:] = rng.random((nh, nw)) < 0.5  # touches the bottom and right edges
    noise[h - 1, w - 1] = True
    sparse = rng.random((h, w)) < 0.02
    sparse[cy, cx] = True

    cases = {
        "pixel_centre": pixels((cy, cx)),
        "pixel_top_left": pixels((0, 0)),
        "pixel_top_right": pixels((0, w - 1)),
        "pixel_bottom_left": pixels((h - 1, 0)),
        "pixel_bottom_right": pixels((h - 1, w - 1)),
        "two_pixels_apart": pixels((0, 0), (h - 1, w - 1)),
        "hline_middle": block(cy, cy + 1, 0, w),
        "hline_top_edge": block(0, 1, 0, w),
        "hline_bottom_edge": block(h - 1, h, 0, w),
        "hline_short": block(cy, cy + 1, cx, min(w, cx + 3)),
        "vline_middle": block(0, h, cx, cx + 1),
        "vline_left_edge": block(0, h, 0, 1),
        "vline_right_edge": block(0, h, w - 1, w),
        "vline_short": block(cy, min(h, cy + 3), cx, cx + 1),
        "diagonal": pixels(*[(i, i) for i in range(n)]),
        "antidiagonal_to_corner": pixels(*[(h - 1 - i, w - n + i) for i in range(n)]),  # ends at top right
        "checker_2x2": pixels((cy - 1, cx - 1), (cy, cx)),
        "checker_2x2_anti": pixels((cy - 1, cx), (cy, cx - 1)),
        "checker_2x2_corner": pixels((h - 2, w - 1), (h - 1, w - 2)),
        "checkerboard": checker,
        "edge_top": block(0, k, w // 4, max(w // 4 + 1, 3 * w // 4)),
        "edge_bottom": block(h - k, h, w // 4, max(w // 4 + 1, 3 * w // 4)),
        "edge_left": block(h // 4, max(h // 4 + 1, 3 * h // 4), 0, k),
        "edge_right": block(h // 4, max(h // 4 + 1, 3 * h // 4), w - k, w),
        "corner_top_left": block(0, k, 0, k),
        "corner_top_right": block(0, k, w - k, w),
        "corner_bottom_left": block(h - k, h, 0, k),
        "corner_bottom_right": block(h - k, h, w - k, w),
        "full_image": np.ones((h, w), bool),
        "frame": frame,
        "ring": (d < 0.45 * n) & (d >= 0.45 * n - max(1.0, n / 10)),
        "many_pieces": pieces,
        "crumb": crumb,
        "noise": noise,
        "sparse_noise": sparse,
    }
    assert np.count_nonzero(cases["many_pieces"]) and _n_pieces(pieces) > MAX_PIECES
    return cases


def _n_pieces(mask: np.ndarray) -> int:
    import cv2

    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def extent(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def detections(w, h, masks, boxes=None, names=None, scores=None) -> Detections:
    boxes = boxes if boxes is not None else [extent(m) for m in masks]
    names = names if names is not None else [CLASSES[i % len(CLASSES)] for i in range(len(masks))]
    scores = scores if scores is not None else [SCORES[i % len(SCORES)] for i in range(len(masks))]
    return Detections(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                      class_names=list(names), width=w, height=h, masks=[crop_full_mask(m) for m in masks])


@dataclass
class Emitted:
    name: str  # "<size>/<case>/<style>"
    kind: str  # "case", "empty", "clipped", "scene"
    width: int
    height: int
    masks: list[np.ndarray]
    result: ImageResult
    item: dict  # the /predict item Label Studio would get


def _clipped(w, h):
    """Boxes partly outside the image (clipped), and one wholly outside (dropped)."""
    top_left = np.zeros((h, w), bool)
    top_left[: max(1, h // 4), : max(1, w // 4)] = True
    bottom_right = np.zeros((h, w), bool)
    bottom_right[h - max(1, h // 4):, w - max(1, w // 4):] = True
    band = np.zeros((h, w), bool)
    band[h // 2, :] = True
    corner_pixel = np.zeros((h, w), bool)
    corner_pixel[h - 1, w - 1] = True
    masks = [top_left, bottom_right, band, corner_pixel, bottom_right]
    boxes = [[-0.5 * w, -0.3 * h, w / 4, h / 4],
             [0.75 * w - 0.3, 0.75 * h - 0.3, 1.6 * w, 1.3 * h],
             [-10, h / 2 - 0.25, w + 10, h / 2 + 0.75],
             [w - 0.25, h - 0.25, w + 3, h + 3],  # a quarter pixel inside
             [w + 5, h + 5, w + 50, h + 50]]  # wholly outside: no region
    return masks, boxes


def emit_all() -> list[Emitted]:
    out = []

    def add(name, kind, w, h, masks, dets):
        for style_name, style in STYLES.items():
            result = image_result(dets, TARGETS, THRESHOLD, style=style)
            out.append(Emitted(f"{w}x{h}/{name}/{style_name}", kind, w, h, masks, result,
                               prediction_item(result.regions, "v1")))

    for w, h in SIZES:
        for i, (name, mask) in enumerate(edge_cases(w, h).items()):
            add(name, "case", w, h, [mask],
                detections(w, h, [mask], names=[CLASSES[i % len(CLASSES)]], scores=[SCORES[i % len(SCORES)]]))
        empty = np.zeros((h, w), bool)
        add("empty_mask", "empty", w, h, [empty],
            detections(w, h, [empty], boxes=[[0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h]]))
        masks, boxes = _clipped(w, h)
        add("clipped_boxes", "clipped", w, h, masks, detections(w, h, masks, boxes=boxes))
    for seed, w, h in SCENES:
        img, objects = make_scene_with_masks(seed, w, h)
        w, h = img.size
        masks = [o["mask"] for o in objects]
        add(f"scene_{seed}", "scene", w, h, masks,
            detections(w, h, masks, boxes=[o["bbox"] for o in objects], names=[o["label"] for o in objects]))
    return out


@pytest.fixture(scope="module")
def emitted() -> list[Emitted]:
    return emit_all()


def by_type(regions: list[dict], kind: str) -> list[dict]:
    return [r for r in regions if r["type"] == kind]


# ------------------------------------------------------- in-process checks --
def test_every_instance_gives_its_regions(emitted):
    """Nothing is dropped silently, so the validation below sees every case."""
    for e in emitted:
        regions, stats = e.result.regions, e.result.stats
        assert stats.over_cap == 0 and stats.below_threshold == 0 and stats.unmapped == 0, e.name
        if e.kind in ("case", "scene"):
            n = len(e.masks)
            assert stats.empty_mask == 0 and stats.invalid == 0, e.name
            assert len(by_type(regions, "rectanglelabels")) == n, e.name
            assert len(by_type(regions, "brushlabels")) == n, e.name
            assert len(by_type(regions, "polygonlabels")) >= n, e.name


def test_empty_mask_gives_a_rectangle_and_no_mask_region(emitted):
    empties = [e for e in emitted if e.kind == "empty"]
    assert len(empties) == len(SIZES) * len(STYLES)
    for e in empties:
        assert [r["type"] for r in e.result.regions] == ["rectanglelabels"], e.name
        assert e.result.stats.empty_mask == N_MASK_TARGETS, e.name  # counted once per mask tag
        assert e.result.stats.kept == 1, e.name
        value = e.result.regions[0]["value"]
        assert (value["x"], value["y"]) == (pytest.approx(20), pytest.approx(20))
        assert (value["width"], value["height"]) == (pytest.approx(60), pytest.approx(60))


def test_boxes_outside_the_image_are_clipped_or_dropped(emitted):
    clipped = [e for e in emitted if e.kind == "clipped"]
    assert len(clipped) == len(SIZES) * len(STYLES)
    for e in clipped:
        stats, rects = e.result.stats, by_type(e.result.regions, "rectanglelabels")
        assert stats.invalid == len(TARGETS), e.name  # the box wholly outside, once per tag
        assert len(rects) == 4 and len(by_type(e.result.regions, "brushlabels")) == 4, e.name
        for r in rects:
            v = r["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100, (e.name, v)
            assert 0 < v["width"] and v["x"] + v["width"] <= 100 + 1e-9, (e.name, v)
            assert 0 < v["height"] and v["y"] + v["height"] <= 100 + 1e-9, (e.name, v)


def test_regions_are_well_formed_beyond_what_label_studio_checks(emitted):
    """Label Studio's models check only `<= 100` and labels; the editor needs more."""
    brushes_by_image = {}
    for e in emitted:
        json.dumps(e.item, allow_nan=False)  # strict JSON
        assert 0.0 <= e.item["score"] <= 1.0, e.name
        for r in e.result.regions:
            v = r["value"]
            assert (r["original_width"], r["original_height"]) == (e.width, e.height), e.name
            if r["type"] == "polygonlabels":
                pts = np.asarray(v["points"], dtype=np.float64)
                assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3, (e.name, v["points"])
                assert ((0 <= pts) & (pts <= 100)).all(), (e.name, v["points"])
                assert is_valid_polygon(pts), (e.name, v["points"])
            elif r["type"] == "brushlabels":
                assert v["format"] == "rle" and all(type(b) is int and 0 <= b <= 255 for b in v["rle"]), e.name
        base = e.name.rsplit("/", 1)[0]
        rles = [r["value"]["rle"] for r in by_type(e.result.regions, "brushlabels")]
        if base in brushes_by_image:
            assert rles == brushes_by_image[base], e.name  # the style changes polygons only
            continue
        brushes_by_image[base] = rles
        if e.kind == "case":  # one instance: its brush is exactly its mask
            (rle,) = rles
            np.testing.assert_array_equal(brush_rle_to_mask(rle, e.height, e.width), e.masks[0], err_msg=e.name)


# ------------------------------------------------------ Label Studio's check --
VALIDATE = textwrap.dedent("""
    import json, sys
    from label_studio_sdk.label_interface import LabelInterface

    payload = json.load(open(sys.argv[1]))  # what requests' .json() gives ml/models.py
    out = {}
    for name, item in zip(payload["names"], payload["results"]):
        # ml/models.py _get_predictions_from_ml_backend keeps result, score and model_version;
        # PredictionSerializer's fields turn them into what validate() gets (JSONField as is,
        # FloatField -> float, CharField -> str).
        data = {
            "result": item["result"],
            "score": None if item.get("score") is None else float(item["score"]),
            "model_version": str(item["model_version"]),
        }
        # tasks/serializers.py PredictionSerializer.validate, verbatim:
        li = LabelInterface(payload["label_config"])
        out[name] = li.validate_prediction(data, return_errors=True)
    json.dump(out, open(sys.argv[2], "w"))
""")


def _negative_controls(emitted) -> dict[str, tuple[dict, str]]:
    """Emitted items made invalid in one place -> (item, part of the expected message)."""
    scene = next(e for e in emitted if e.kind == "scene")

    def one(kind, change):
        region = copy.deepcopy(by_type(scene.result.regions, kind)[0])
        change(region)
        return prediction_item([region], "v1")

    def polygon_x(r):
        r["value"]["points"][0][0] = 150.0

    def brush_byte(r):
        r["value"]["rle"][5] = 300

    def rect_x(r):
        r["value"]["x"] = 150.0

    def alias_label(r):
        r["value"]["rectanglelabels"] = ["car"]  # the class name, not the <Label value>

    bad_score = dict(scene.item, score=1.5)
    return {
        "negative/polygon_point_x_150": (one("polygonlabels", polygon_x), "Invalid value for control 'outline'"),
        "negative/brush_rle_300": (one("brushlabels", brush_byte), "Invalid value for control 'paint'"),
        "negative/rectangle_x_150": (one("rectanglelabels", rect_x), "x 150.0 out of bounds"),
        "negative/alias_label": (one("rectanglelabels", alias_label), "Invalid value for control 'box'"),
        "negative/prediction_score_1.5": (bad_score, "Score must be between"),
    }


def test_label_studio_accepts_every_emitted_prediction(emitted, tmp_path):
    # Fails (does not skip) without Label Studio, as the e2e tests do.
    venv, _, _ = ensure_installed()
    negatives = _negative_controls(emitted)
    names = [e.name for e in emitted] + list(negatives)
    results = [e.item for e in emitted] + [item for item, _ in negatives.values()]
    assert len(set(names)) == len(names)
    # As the service renders it (deployments/http_io.dumps_compact), and strict JSON.
    body = json.dumps({"label_config": CONFIG, "names": names, "results": results},
                      ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    (tmp_path / "predict.json").write_text(body)
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", VALIDATE, str(tmp_path / "predict.json"),
                           str(tmp_path / "errors.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"Label Studio's validator did not run:\n{proc.stderr}"
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert sorted(errors) == sorted(names)

    # The negative controls: the same call rejects an emitted item made invalid.
    for name, (_, expected) in negatives.items():
        assert errors[name], f"{name} was accepted: the validator call checks nothing"
        assert any(expected in message for message in errors[name]), (name, errors[name])

    rejected = {e.name: errors[e.name] for e in emitted if errors[e.name]}
    if rejected:
        regions = {e.name: e.item["result"] for e in emitted}
        lines = []
        for name, messages in rejected.items():
            lines.append(f"{name}:")
            for message in messages:
                lines.append(f"  {message[:600]}")
                index = message.split(":", 1)[0].removeprefix("Region ")
                if index.isdigit():
                    region = json.dumps(regions[name][int(index)])
                    lines.append(f"    region: {region[:600]}")
        pytest.fail(f"Label Studio rejects {len(rejected)} of {len(emitted)} predictions:\n" + "\n".join(lines))
    # Not vacuous: every kind of region went through.
    kinds = {r["type"] for e in emitted for r in e.item["result"]}
    assert kinds == {"rectanglelabels", "polygonlabels", "brushlabels"}
