"""mmdet_ls.acceleration on real models: the same results as eager, no recompilation per image size,
eager with a reason when compilation fails.

Compiled graphs persist in the compile cache (acceleration.default_cache_dir(), or
TORCHINDUCTOR_CACHE_DIR when set), so a second run of this file compiles from the cache.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from model_fixtures import FASTER_RCNN, TOY_CHECKPOINT, TOY_CONFIG, save_random_checkpoint
from toy_detector.scenes import make_scene

from mmdet_ls.acceleration import (
    AccelerationError,
    accelerate,
    compile_count,
    current_mode,
    set_mode,
)
from mmdet_ls.failures import TaskFailure
from mmdet_ls.inference import BatchDetector
from mmdet_ls.model_files import resolve_config_file

SHIPPED = ("channels_last", "compile")
# Relative to the largest magnitude in the eager tensor. Float32 with another order of
# accumulation (BN folded into the conv weights, fused kernels, NHWC convolution algorithms)
# over ResNet-50 + FPN measured ~3e-6 here; 1e-4 leaves 30x headroom and still catches a
# wrong layout or a wrong weight (those are off by the order of the values themselves).
REL_TOL = 1e-4


def bgr(seed: int, w: int, h: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(make_scene(seed, w, h)[0])[:, :, ::-1])


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box against many."""
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def assert_same_boxes(want, got, min_score=0.05, score_tol=1e-4):
    """Every box of one scoring min_score or more is in the other: same label, IoU >= 0.99, score within
    score_tol (both ways; near the threshold a box may sit on either side of it)."""
    for a, b, floor in ((want, got, min_score), (got, want, min_score + score_tol)):
        for box, score, name in zip(a.boxes, a.scores, a.class_names):
            if score < floor:
                continue
            same = np.array([n == name for n in b.class_names], dtype=bool)
            ok = same & (iou(box, b.boxes) >= 0.99) & (np.abs(b.scores - score) <= score_tol)
            assert ok.any(), f"{name} {box} ({score:.4f}) has no match"


# -- the toy detector: same boxes ------------------------------------------------------------

TOY_SCENES = [(11, 320, 240), (12, 240, 320), (13, 400, 300), (14, 256, 256)]


@pytest.fixture(scope="module")
def toy():
    det = BatchDetector(str(TOY_CONFIG), str(TOY_CHECKPOINT), "cpu")
    images = [bgr(*s) for s in TOY_SCENES]
    eager = det.detect(images, stacked=False)
    assert all(not isinstance(d, TaskFailure) and (d.scores >= 0.5).any() for d in eager)
    return det, images, eager


@pytest.mark.parametrize("mode", SHIPPED)
def test_toy_detector_gives_the_eager_boxes(toy, mode):
    det, images, eager = toy
    report = accelerate(det.model, mode, warmup=lambda: det.detect(images[:2], stacked=False), images=2, repeats=0)
    try:
        assert (report.mode, current_mode(det.model)) == (mode, mode), report.reason
        got = det.detect(images, stacked=False)
    finally:
        set_mode(det.model, "eager")
    for want, have in zip(eager, got):
        assert_same_boxes(want, have)
    # and back to eager, the model is what it was
    for want, have in zip(eager, det.detect(images, stacked=False)):
        np.testing.assert_array_equal(want.boxes, have.boxes)


@pytest.mark.parametrize("backend, error", [("no_such_backend", "no_such_backend"), ("tvm", "tvm")])
def test_a_compile_failure_leaves_the_model_eager_with_the_reason(toy, monkeypatch, backend, error):
    """no_such_backend: no backend by that name; tvm: a registered backend whose compiler is not installed,
    so it fails while compiling the first call (which BatchDetector.detect turns into a TaskFailure)."""
    det, images, eager = toy
    monkeypatch.setenv("MMDET_LS_COMPILE_BACKEND", backend)
    warmup = lambda: det.detect(images[:1], stacked=False)  # noqa: E731
    report = accelerate(det.model, "auto", warmup=warmup, candidates=("compile",), repeats=1)
    assert (report.mode, current_mode(det.model)) == ("eager", "eager")
    assert report.eager_s_per_image > 0 and report.chosen_s_per_image == report.eager_s_per_image
    assert "compile failed" in report.reason and error in report.reason, report.reason
    assert error in report.candidates["compile"]["error"]

    asked = accelerate(det.model, "compile", warmup=warmup, repeats=0)
    assert asked.fell_back and asked.mode == "eager" and error in asked.reason, asked.reason
    for want, have in zip(eager, det.detect(images, stacked=False)):
        np.testing.assert_array_equal(want.boxes, have.boxes)


def test_a_mode_that_does_not_exist_is_refused(toy):
    with pytest.raises(AccelerationError, match="must be one of"):
        accelerate(toy[0].model, "fast", warmup=lambda: None)


# -- Faster R-CNN: raw head outputs, and no recompilation over image sizes --------------------

# The warm-up at start-up, then sizes never seen: Faster R-CNN keeps the aspect ratio (scale 1333x800,
# padded to a multiple of 32), so each of these reaches the backbone at another shape.
WARMUP_SIZES = [(640, 480), (480, 640)]
MIXED_SIZES = [(1280, 720), (1000, 1000), (320, 256), (700, 900)]


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory):
    checkpoint = save_random_checkpoint(FASTER_RCNN, tmp_path_factory.mktemp("frcnn") / "frcnn.pth", seed=0)
    det = BatchDetector(resolve_config_file(FASTER_RCNN), str(checkpoint), "cpu")
    warmup = [bgr(20 + i, w, h) for i, (w, h) in enumerate(WARMUP_SIZES)]
    report = accelerate(det.model, "compile", warmup=lambda: det.detect(warmup, stacked=False), repeats=0)
    assert report.mode == "compile", report.reason
    assert report.dynamic and len(report.input_shapes) == 2, report
    assert report.frozen, report  # the CPU default: weights frozen into the graph (BN folded, prepacked)
    yield det, report
    set_mode(det.model, "eager")


def backbone_inputs(det, images) -> list[tuple[torch.Tensor, list]]:
    """What the model's backbone gets for each image (pipeline, then the data preprocessor's
    normalisation and padding), with its data samples."""
    out = []
    for i, image in enumerate(images):
        p = det._prepare(image, i)
        data = det.model.data_preprocessor({"inputs": [p["inputs"]], "data_samples": [p["data_samples"]]}, False)
        out.append((data["inputs"], data["data_samples"]))
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.shape == want.shape, what
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= REL_TOL * scale, f"{what}: max error {err:.3g} > {REL_TOL} x {scale:.3g}"


@pytest.mark.parametrize("mode", SHIPPED)
def test_faster_rcnn_head_outputs_match_eager(frcnn, mode):
    """Backbone + neck outputs (what the RPN and RoI heads get), the RPN head's raw outputs, and the
    RoI head's raw outputs on eager's proposals (RoIAlign reads the accelerated feature maps)."""
    det, _ = frcnn
    model = det.model
    (x, samples), = backbone_inputs(det, [bgr(30, 500, 375)])
    compiled = compile_count(model)
    with torch.no_grad():
        set_mode(model, "eager")
        feats = model.extract_feat(x)
        rpn = model.rpn_head(feats)
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        roi = model.roi_head.forward(feats, proposals, samples)
        set_mode(model, mode)
        try:
            got_feats = model.extract_feat(x)
            got_rpn = model.rpn_head(got_feats)
            got_roi = model.roi_head.forward(got_feats, proposals, samples)
        finally:
            set_mode(model, "compile")  # as the fixture left it (the compiled function was kept)
    assert compile_count(model) == compiled  # set_mode("compile") reuses what the start-up compiled
    assert len(feats) == 5 and all(f.is_contiguous() for f in got_feats)
    for level, (g, w) in enumerate(zip(got_feats, feats)):
        assert_close(g, w, f"feature level {level}")
    for kind, g_levels, w_levels in zip(("rpn cls", "rpn reg"), got_rpn, rpn):
        for level, (g, w) in enumerate(zip(g_levels, w_levels)):
            assert_close(g, w, f"{kind} level {level}")
    assert len(proposals[0]) > 0
    for i, (g, w) in enumerate(zip(got_roi, roi)):
        assert_close(g, w, f"roi head output {i}")


def test_mixed_image_sizes_do_not_recompile(frcnn):
    det, report = frcnn
    model = det.model
    images = [bgr(40 + i, w, h) for i, (w, h) in enumerate(MIXED_SIZES)]
    shapes = [tuple(x.shape[-2:]) for x, _ in backbone_inputs(det, images)]
    assert len(set(shapes)) == len(shapes), shapes  # each image a new shape...
    assert not set(shapes) & {tuple(s) for s in report.input_shapes}, (shapes, report.input_shapes)  # ...unseen
    from torch._dynamo.utils import counters

    compiled, frames = compile_count(model), counters["frames"]["ok"]
    assert compiled >= 1
    # from a worker thread, as the Detector calls it (asyncio.to_thread)
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(det.detect, images, False).result()
    assert not [r for r in results if isinstance(r, TaskFailure)], results
    assert current_mode(model) == "compile"
    assert (compile_count(model), counters["frames"]["ok"]) == (compiled, frames)
    import torch._inductor.config

    assert torch._inductor.config.freezing is False  # set around each compiled call only, never left behind
