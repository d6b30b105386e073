"""Test helpers for instance masks, shared by the unit and e2e tests."""
from __future__ import annotations

import numpy as np

# A centre this close to an edge counts as on it: Label Studio's points are
# percent rounded to 4 decimals, a thousandth of a pixel on a 2000 px side.
ON_EDGE_PX = 0.01


def rasterize(polygons, height: int, width: int) -> np.ndarray:
    """Bool (height, width): pixels whose centre is inside or on any polygon."""
    out = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        x0, y0 = max(0, int(np.floor(poly[:, 0].min())) - 1), max(0, int(np.floor(poly[:, 1].min())) - 1)
        x1, y1 = min(width, int(np.ceil(poly[:, 0].max())) + 1), min(height, int(np.ceil(poly[:, 1].max())) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        cx, cy = xs.ravel() + 0.5, ys.ravel() + 0.5
        inside = np.zeros(cx.size, dtype=bool)
        on = np.zeros(cx.size, dtype=bool)
        for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, axis=0)):
            cross = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
            near_line = np.abs(cross) <= ON_EDGE_PX * np.hypot(bx - ax, by - ay)
            on |= (near_line & (np.minimum(ax, bx) - ON_EDGE_PX <= cx) & (cx <= np.maximum(ax, bx) + ON_EDGE_PX)
                   & (np.minimum(ay, by) - ON_EDGE_PX <= cy) & (cy <= np.maximum(ay, by) + ON_EDGE_PX))
            if ay != by:
                crosses = (ay > cy) != (by > cy)
                inside ^= crosses & (cx < ax + (cy - ay) * (bx - ax) / (by - ay))
        out[y0:y1, x0:x1] |= (inside | on).reshape(y1 - y0, x1 - x0)
    return out


def rasterize_percent(points: list, width: int, height: int) -> np.ndarray:
    """rasterize() of one Label Studio polygon (points in percent)."""
    pixels = np.asarray(points, dtype=np.float64) * (width / 100.0, height / 100.0)
    return rasterize([pixels], height, width)
