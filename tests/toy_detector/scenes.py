"""Deterministic synthetic detection scenes for the toy RTMDet detector.

Every scene is a noisy / textured light background with 1-4 non-overlapping
objects of three classes, named after COCO labels so that the service can be
exercised with real label names:

* ``car``      -- wide red body with a cabin, a window and two black wheels
* ``airplane`` -- blue plus/cross: long fuselage, a full-height wing bar and a
                  tail fin
* ``person``   -- tall green figure: round head, elliptic torso, two legs

The classes differ in *shape* (wide / cross / tall) as well as colour, and
every part has a dark outline, so they stay separable after a grayscale
conversion.  Ground-truth boxes are exact: they are the bounding box of the
pixels actually painted for the object, in pixel-edge coordinates
``[x1, y1, x2, y2]`` (``x2 - x1`` is the width in pixels).

Public API::

    CLASSES = ('car', 'airplane', 'person')
    make_scene(seed, width=None, height=None) -> (PIL.Image RGB, objects)
        objects: [{'bbox': [x1, y1, x2, y2], 'label': 'car'}, ...]
    write_coco_dataset(out_dir, n_images, seed_offset) -> path of the json

Only numpy and Pillow are needed (no torch / mmdet), so the service tests can
import this module cheaply.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('car', 'airplane', 'person')

# Default scene side range (pixels) and object size range (longer box side,
# pixels) for a default-size scene.  Larger scenes scale objects up, see
# ``object_scale``.
MIN_SIDE, MAX_SIDE = 256, 416
MIN_OBJ, MAX_OBJ = 30, 150
MAX_OBJECTS = 4


def object_scale(width: int, height: int) -> float:
    """Factor applied to object sizes: 1 for default-size scenes, growing
    with the longer side beyond 416 px (so a 2000x900 scene has objects
    about 4.8x larger, capped by the shorter side)."""
    return max(1.0, max(width, height) / MAX_SIDE)


# ----------------------------------------------------------------- colours --
def _uint(rng, lo, hi):
    return int(rng.integers(lo, hi + 1))


def _light_colour(rng):
    # Every channel >= 140 keeps the background luminance >= 140, well above
    # the luminance of the object fills (~70-110), also in grayscale.
    return np.array([_uint(rng, 140, 250) for _ in range(3)], dtype=np.float32)


def _dark(rng):
    v = _uint(rng, 0, 40)
    return (v, v, v)


def _car_colour(rng):
    return (_uint(rng, 160, 235), _uint(rng, 10, 60), _uint(rng, 10, 60))


def _airplane_colour(rng):
    return (_uint(rng, 10, 60), _uint(rng, 40, 100), _uint(rng, 160, 235))


def _person_colour(rng):
    return (_uint(rng, 10, 60), _uint(rng, 105, 165), _uint(rng, 10, 60))


def _shade(c, f):
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)


# -------------------------------------------------------------- background --
def _background(rng, width: int, height: int) -> np.ndarray:
    """Light textured background, float32 HxWx3."""
    c0, c1 = _light_colour(rng), _light_colour(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = int(rng.integers(3))
    ang = float(rng.uniform(0, math.pi))
    proj = xx * math.cos(ang) + yy * math.sin(ang)
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(1e-6, float(proj.max() - proj.min()))
    elif kind == 1:  # soft stripes
        period = float(rng.uniform(10, 40))
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period)
    else:  # blotches: upsampled low-resolution noise
        gh, gw = _uint(rng, 3, 9), _uint(rng, 3, 9)
        low = (rng.random((gh, gw)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR),
                       dtype=np.float32) / 255.0
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # a few faint random lines as clutter
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(_uint(rng, 0, 6)):
        col = tuple(int(v) for v in np.clip(_light_colour(rng) - rng.uniform(0, 40), 0, 255))
        pts = [(_uint(rng, 0, width - 1), _uint(rng, 0, height - 1)) for _ in range(2)]
        draw.line(pts, fill=col, width=_uint(rng, 1, 3))
    img = np.asarray(pil, dtype=np.float32)
    sigma = float(rng.uniform(3, 18))
    if rng.random() < 0.5:
        noise = rng.normal(0, sigma, (height, width, 1))
    else:
        noise = rng.normal(0, sigma, (height, width, 3))
    return img + noise.astype(np.float32)


# ----------------------------------------------------------------- objects --
def _draw_car(draw, rng, w, h, ow):
    body = _car_colour(rng)
    dark = _dark(rng)
    r = max(3, round(h * 0.2))  # wheel radius
    body_top = round(h * 0.38)
    body_bot = h - 1 - r // 2
    # cabin (trapezoid) on top of the body
    cx0, cx1 = round(w * 0.2), round(w * 0.75)
    slope = round((cx1 - cx0) * 0.18)
    draw.polygon([(cx0, body_top), (cx0 + slope, 0), (cx1 - slope, 0), (cx1, body_top)],
                 fill=_shade(body, 0.8), outline=dark, width=ow)
    # window
    wx0, wx1 = cx0 + slope + max(2, ow + 1), cx1 - slope - max(2, ow + 1)
    wy0, wy1 = max(ow + 1, round(h * 0.08)), body_top - max(1, ow)
    if wx1 > wx0 + 2 and wy1 > wy0 + 2:
        draw.rectangle([wx0, wy0, wx1, wy1], fill=(200, 225, 240))
    # body
    draw.rectangle([0, body_top, w - 1, body_bot], fill=body, outline=dark, width=ow)
    # wheels touching the bottom edge
    for fx in (0.24, 0.76):
        cx = round(w * fx)
        draw.ellipse([cx - r, h - 1 - 2 * r, cx + r, h - 1], fill=(25, 25, 25), outline=dark,
                     width=ow)
        hr = max(1, r // 2)
        cy = h - 1 - r
        draw.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=(150, 150, 150))


def _draw_airplane(draw, rng, w, h, ow, nose_left):
    col = _airplane_colour(rng)
    dark = _dark(rng)
    fth = max(5, round(h * 0.2))  # fuselage thickness
    fy0 = (h - fth) // 2
    fy1 = fy0 + fth
    # wings: full-height bar, tapered (trapezoid), near the middle
    wx = round(w * 0.42)
    root, tip = max(6, round(w * 0.22)), max(4, round(w * 0.1))
    wing = [(wx, 0), (wx + tip, 0), (wx + root, fy0), (wx + root, fy1),
            (wx + tip, h - 1), (wx, h - 1)]
    # tail fin
    tx = round(w * 0.86)
    tth = max(3, round(w * 0.08))
    tail = [(tx, round(h * 0.22)), (tx + tth, round(h * 0.22)), (min(w - 1, tx + tth + 2), fy0),
            (min(w - 1, tx + tth + 2), fy1), (tx + tth, round(h * 0.78)), (tx, round(h * 0.78))]
    fus = [0, fy0, w - 1, fy1]

    def fx(x):
        return x if nose_left else (w - 1 - x)

    def poly(pts):
        return [(fx(x), y) for x, y in pts]

    draw.polygon(poly(wing), fill=_shade(col, 0.85), outline=dark, width=ow)
    draw.polygon(poly(tail), fill=_shade(col, 0.85), outline=dark, width=ow)
    x0, x1 = sorted((fx(fus[0]), fx(fus[2])))
    draw.rounded_rectangle([x0, fus[1], x1, fus[3]], radius=fth // 2, fill=col, outline=dark,
                           width=ow)


def _draw_person(draw, rng, w, h, ow):
    col = _person_colour(rng)
    dark = _dark(rng)
    d = max(6, round(min(w * 0.62, h * 0.24)))  # head diameter
    cx = (w - 1) / 2
    torso_top = round(d * 0.85)
    torso_bot = round(h * 0.7)
    leg_w = max(3, round(w * 0.24))
    # legs (touch the bottom edge)
    for lx in (round(w * 0.2), round(w * 0.8) - leg_w):
        draw.rectangle([lx, round(h * 0.55), lx + leg_w, h - 1], fill=_shade(col, 0.7),
                       outline=dark, width=ow)
    # torso: ellipse spanning the full width
    draw.ellipse([0, torso_top, w - 1, torso_bot], fill=col, outline=dark, width=ow)
    # head
    draw.ellipse([round(cx - d / 2), 0, round(cx + d / 2), d], fill=_shade(col, 1.25),
                 outline=dark, width=ow)


def _object_wh(rng, label, s, max_side):
    """Box size (w, h) for a class; s = object scale, max_side = cap."""
    longer = min(float(rng.uniform(MIN_OBJ, MAX_OBJ)) * s, max_side)
    if label == 'car':
        w = longer
        h = w * rng.uniform(0.5, 0.68)
    elif label == 'airplane':
        w = longer
        h = w * rng.uniform(0.72, 0.95)
    else:  # person
        h = longer
        w = h * rng.uniform(0.38, 0.5)
    # keep the shorter side >= 20 px (x s) so boxes can be localised to
    # IoU >= 0.8 after the detector's resize
    short = min(w, h)
    if short < 20 * s:
        f = min(20 * s / short, max_side / max(w, h))
        w, h = w * f, h * f
    return max(12, int(round(w))), max(12, int(round(h)))


def _render_object(rng, label, w, h, s):
    """Return (RGB image, L mask) of size (w, h) with the object drawn."""
    layer = Image.new('RGB', (w, h), (0, 0, 0))
    mask = Image.new('L', (w, h), 0)
    ow = max(1, int(round(min(w, h) / 22)))
    seed = int(rng.integers(2**31))
    nose_left = bool(rng.random() < 0.5)
    for target, white in ((layer, False), (mask, True)):
        sub = np.random.default_rng(seed)
        d = _WhiteDraw(ImageDraw.Draw(target)) if white else ImageDraw.Draw(target)
        if label == 'car':
            _draw_car(d, sub, w, h, ow)
        elif label == 'airplane':
            _draw_airplane(d, sub, w, h, ow, nose_left)
        else:
            _draw_person(d, sub, w, h, ow)
    return layer, mask


class _WhiteDraw:
    """ImageDraw proxy that paints every primitive with value 255 (mask)."""

    def __init__(self, draw):
        self._d = draw

    def __getattr__(self, name):
        fn = getattr(self._d, name)

        def wrapped(*args, **kw):
            if 'fill' in kw:
                kw['fill'] = 255
            if 'outline' in kw:
                kw['outline'] = 255
            return fn(*args, **kw)

        return wrapped


def _intersects(a, b, margin):
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------- scene --
def make_scene(seed: int, width: Optional[int] = None, height: Optional[int] = None):
    """Render scene ``seed``.

    Returns ``(image, objects)``: an RGB ``PIL.Image`` of ``width`` x
    ``height`` (each drawn from 256-416 when not given) and a list of
    ``{'bbox': [x1, y1, x2, y2], 'label': name}`` with exact pixel boxes.
    Objects never overlap (boxes are at least a few pixels apart).  The same
    arguments always give the same image.
    """
    return _render_scene(seed, width, height, with_masks=False)


def make_scene_with_masks(seed: int, width: Optional[int] = None, height: Optional[int] = None):
    """``make_scene`` (the same pixels and boxes) whose objects also carry
    ``'mask'``: a bool ``H x W`` array, True exactly where the object was
    painted (its box is the mask's extent)."""
    return _render_scene(seed, width, height, with_masks=True)


def _render_scene(seed, width, height, with_masks: bool):
    rng = np.random.default_rng([int(seed), 0x70D])
    W = int(width) if width is not None else _uint(rng, MIN_SIDE, MAX_SIDE)
    H = int(height) if height is not None else _uint(rng, MIN_SIDE, MAX_SIDE)
    if W < 64 or H < 64:
        raise ValueError('scenes must be at least 64x64')
    s = object_scale(W, H)
    max_side = 0.7 * min(W, H)
    img = _background(rng, W, H)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    n = _uint(rng, 1, MAX_OBJECTS)
    placed = []  # (box, label, layer, mask)
    margin = 4 * s
    for _ in range(n):
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        for attempt in range(60):
            shrink = 0.85 ** (attempt // 10)
            w, h = _object_wh(rng, label, s * shrink, max_side * shrink)
            if w >= W - 2 or h >= H - 2:
                continue
            x = _uint(rng, 1, W - w - 1)
            y = _uint(rng, 1, H - h - 1)
            box = (x, y, x + w, y + h)
            if any(_intersects(box, p[0], margin) for p in placed):
                continue
            layer, mask = _render_object(rng, label, w, h, s)
            placed.append((box, label, layer, mask))
            break

    objects = []
    for (x, y, _, _), label, layer, mask in placed:
        canvas.paste(layer, (x, y), mask)
        bx1, by1, bx2, by2 = mask.getbbox()
        obj = {'bbox': [x + bx1, y + by1, x + bx2, y + by2], 'label': label}
        if with_masks:  # painted pixels only: the paste mask is 0 or 255 (no anti-aliasing)
            full = np.zeros((H, W), dtype=bool)
            full[y:y + mask.height, x:x + mask.width] = np.asarray(mask) > 0
            obj['mask'] = full
        objects.append(obj)
    # mild global sensor noise over objects too (deterministic)
    arr = np.asarray(canvas, dtype=np.float32)
    arr += rng.normal(0, float(rng.uniform(0, 5)), arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
    return out, objects


def to_grayscale(img: Image.Image) -> Image.Image:
    """Grayscale version of a scene, still as a 3-channel RGB image."""
    return img.convert('L').convert('RGB')


# -------------------------------------------------------------------- coco --
def _variant(seed: int, variety: bool, grayscale_frac: float):
    """Per-image size / grayscale choice used by ``write_coco_dataset``."""
    rng = np.random.default_rng([int(seed), 0xDA7A])
    width = height = None
    if variety and rng.random() < 0.3:
        # larger and/or elongated images (objects scale up with the size)
        longer = _uint(rng, 416, 1280)
        aspect = float(rng.uniform(1.0, 2.6))
        shorter = max(200, int(round(longer / aspect)))
        if rng.random() < 0.7:
            width, height = longer, shorter
        else:
            width, height = shorter, longer
    gray = bool(rng.random() < grayscale_frac)
    return width, height, gray


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool H x W mask (column-major runs,
    starting with a run of zeros); pycocotools and mmdet read it."""
    flat = np.asarray(mask, dtype=bool).flatten(order='F')
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {'size': [int(mask.shape[0]), int(mask.shape[1])], 'counts': [int(c) for c in counts]}


def write_coco_dataset(out_dir, n_images: int, seed_offset: int = 0, *, variety: bool = True,
                       grayscale_frac: float = 0.2, image_format: str = 'jpg',
                       jpeg_quality: int = 92, with_masks: bool = False) -> str:
    """Write scenes ``seed_offset .. seed_offset + n_images - 1`` as a COCO
    detection dataset: ``out_dir/images/<seed>.jpg`` and
    ``out_dir/annotations.json`` (category ids 1..3 in ``CLASSES`` order).

    With ``variety`` about 30 % of the images are larger (up to 1280 px) or
    elongated (aspect up to 2.6), and ``grayscale_frac`` of them are stored
    as grayscale.  With ``with_masks`` every annotation also holds its exact
    mask as COCO RLE (``segmentation``) and ``area`` is the mask's pixel
    count.  Returns the path of the json file.
    """
    out_dir = os.fspath(out_dir)
    img_dir = os.path.join(out_dir, 'images')
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(n_images):
        seed = seed_offset + i
        width, height, gray = _variant(seed, variety, grayscale_frac)
        img, objects = _render_scene(seed, width, height, with_masks)
        if gray:
            img = to_grayscale(img)
        fname = f'{seed:08d}.{image_format}'
        path = os.path.join(img_dir, fname)
        if image_format == 'jpg':
            img.save(path, quality=jpeg_quality)
        else:
            img.save(path)
        image_id = i + 1
        images.append({'id': image_id, 'file_name': fname, 'width': img.width,
                       'height': img.height, 'seed': seed, 'grayscale': gray})
        for obj in objects:
            x1, y1, x2, y2 = obj['bbox']
            ann = {
                'id': ann_id, 'image_id': image_id,
                'category_id': CLASSES.index(obj['label']) + 1,
                'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
                'iscrowd': 0}
            if with_masks:
                ann['segmentation'] = mask_to_coco_rle(obj['mask'])
                ann['area'] = int(obj['mask'].sum())
            annotations.append(ann)
            ann_id += 1
    coco = {
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i + 1, 'name': c} for i, c in enumerate(CLASSES)],
    }
    ann_path = os.path.join(out_dir, 'annotations.json')
    with open(ann_path, 'w') as f:
        json.dump(coco, f)
    return ann_path


if __name__ == '__main__':  # quick look: python scenes.py OUT_DIR [N]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else 'toy_scenes_preview'
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    print(write_coco_dataset(out, n, 0))


def scene_png(seed: int, size=(320, 240)) -> bytes:
    """A scene of `size` (width, height) encoded as PNG, for serving in tests."""
    import io

    buf = io.BytesIO()
    make_scene(seed, *size)[0].save(buf, 'PNG')
    return buf.getvalue()
