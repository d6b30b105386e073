"""Instance masks: compact crops between deployments, polygons for Label Studio.

A model's masks are full-image (N x H x W). The Detector keeps only each
mask's own extent, bit-packed (`MaskCrop`), so what crosses the object store
is bounded by the instances' areas / 8, not N x H x W. The Postprocess (CPU)
turns crops into <PolygonLabels> points and <BrushLabels> RLE.

Polygons (docs/masks.md):
* the outer contour of each piece of the mask (holes are not drawn), its
  vertices at the centres of the mask's boundary pixels, simplified by
  Douglas-Peucker with `tolerance_px` (pixels of the image as displayed);
* at most `max_points` vertices: past that the tolerance doubles until it fits;
* an instance in several pieces gives one polygon per piece whose area is at
  least MIN_PIECE_FRACTION of its largest piece, at most MAX_PIECES, largest
  first; smaller crumbs are dropped;
* every polygon is simple (no self-crossing), has >= 3 distinct vertices and
  a non-zero area. A contour that is not (a one-pixel-wide line, a single
  pixel) is replaced by the convex hull of its pixels' corners, which is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TOLERANCE_PX = 1.0
DEFAULT_MAX_POINTS = 100
MAX_POINTS_LIMIT = 1000  # what an operator may set max_points to
MIN_PIECE_FRACTION = 0.1
MAX_PIECES = 8


@dataclass(frozen=True)
class MaskCrop:
    """One instance's mask inside its own extent: rows y0..y0+height,
    columns x0..x0+width of the image as displayed, bits packed row-major."""

    x0: int
    y0: int
    width: int
    height: int
    bits: bytes

    @classmethod
    def empty(cls) -> MaskCrop:
        return cls(0, 0, 0, 0, b"")

    @classmethod
    def from_crop(cls, x0: int, y0: int, crop: np.ndarray) -> MaskCrop:
        crop = np.asarray(crop, dtype=bool)
        if not crop.any():
            return cls.empty()
        return cls(int(x0), int(y0), int(crop.shape[1]), int(crop.shape[0]), np.packbits(crop, axis=None).tobytes())

    @property
    def is_empty(self) -> bool:
        return self.width == 0 or self.height == 0

    @property
    def nbytes(self) -> int:
        return len(self.bits)

    def to_array(self) -> np.ndarray:
        """The crop as bool (height, width)."""
        n = self.width * self.height
        return np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=n).astype(bool).reshape(
            self.height, self.width)

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask on the whole (height, width) image, as bool."""
        out = np.zeros((height, width), dtype=bool)
        if not self.is_empty:
            out[self.y0:self.y0 + self.height, self.x0:self.x0 + self.width] = self.to_array()
        return out


def crop_full_mask(mask: np.ndarray) -> MaskCrop:
    """MaskCrop of a full-image bool mask (tests and the CPU path)."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return MaskCrop.empty()
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskCrop.from_crop(x0, y0, mask[y0:y1, x0:x1])


# ------------------------------------------------------------------ polygons --
def _segments_cross(points: np.ndarray) -> bool:
    """True if two non-adjacent edges of the closed polygon intersect or
    touch (collinear overlaps included)."""
    n = len(points)
    if n < 4:
        return False
    a, b = points, np.roll(points, -1, axis=0)
    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # first and last edge share a vertex
    i, j = i[keep], j[keep]
    p1, p2, q1, q2 = a[i], b[i], a[j], b[j]

    def orient(p, q, r):
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    def on_segment(p, q, r):  # r collinear with p-q: inside its bounding box?
        return ((np.minimum(p[:, 0], q[:, 0]) <= r[:, 0]) & (r[:, 0] <= np.maximum(p[:, 0], q[:, 0]))
                & (np.minimum(p[:, 1], q[:, 1]) <= r[:, 1]) & (r[:, 1] <= np.maximum(p[:, 1], q[:, 1])))

    o1, o2, o3, o4 = orient(p1, p2, q1), orient(p1, p2, q2), orient(q1, q2, p1), orient(q1, q2, p2)
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)
    touching = (((o1 == 0) & on_segment(p1, p2, q1)) | ((o2 == 0) & on_segment(p1, p2, q2))
                | ((o3 == 0) & on_segment(q1, q2, p1)) | ((o4 == 0) & on_segment(q1, q2, p2)))
    return bool(np.any(proper | touching))


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def is_valid_polygon(points: np.ndarray) -> bool:
    """>= 3 distinct vertices, no repeated vertex, non-zero area, simple."""
    if len(points) < 3 or len(np.unique(points, axis=0)) != len(points):
        return False
    return polygon_area(points) > 1e-9 and not _segments_cross(points)


def _simplify(contour: np.ndarray, tolerance_px: float, max_points: int) -> np.ndarray:
    import cv2

    epsilon = max(float(tolerance_px), 1e-3)
    while True:
        approx = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2)
        if len(approx) <= max_points:
            return approx
        epsilon *= 2


def _hull_of_pixel_corners(contour: np.ndarray, max_points: int) -> np.ndarray:
    """Convex hull of the pixel squares along a contour, in pixel-edge
    coordinates (simple, with area >= 1 pixel). Past max_points (>= 3), the
    vertex spanning the smallest triangle with its neighbours is dropped
    until it fits: any >= 3 vertices of a strictly convex polygon, in order,
    are a strictly convex polygon (approxPolyDP could leave 2 points)."""
    import cv2

    pts = contour.reshape(-1, 2).astype(np.float32)
    corners = np.concatenate([pts + np.float32(d) for d in ((0, 0), (1, 0), (0, 1), (1, 1))])
    hull = cv2.convexHull(corners).reshape(-1, 2).astype(np.float64)
    while len(hull) > max_points:
        u, v = hull - np.roll(hull, 1, axis=0), np.roll(hull, -1, axis=0) - hull
        hull = np.delete(hull, int(np.argmin(np.abs(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]))), axis=0)
    return hull


def mask_polygons(crop: MaskCrop, tolerance_px: float = DEFAULT_TOLERANCE_PX,
                  max_points: int = DEFAULT_MAX_POINTS) -> list[np.ndarray]:
    """Polygons (float (K, 2) arrays of x, y in pixels of the whole image,
    pixel edges at integers) for one instance, largest piece first; [] for an
    empty mask. See the module docstring for the rules."""
    import cv2

    if crop.is_empty:
        return []
    max_points = max(3, int(max_points))
    # One pixel of padding, so a piece touching the crop's edge has a closed outline.
    padded = np.pad(crop.to_array(), 1).astype(np.uint8)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pieces = sorted(((cv2.contourArea(c) + len(c), c) for c in contours), key=lambda p: -p[0])
    if not pieces:
        return []
    largest = pieces[0][0]
    polygons = []
    for size, contour in pieces[:MAX_PIECES]:
        if size < MIN_PIECE_FRACTION * largest:
            break
        points = _simplify(contour, tolerance_px, max_points).astype(np.float64) + 0.5  # pixel centres
        if not is_valid_polygon(points):
            points = _hull_of_pixel_corners(contour, max_points)
        points += (crop.x0 - 1, crop.y0 - 1)  # back from the padded crop to the image
        polygons.append(points)
    return polygons


def polygon_to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Label Studio's points: [x, y] in percent of the image, clipped to 0-100,
    4 decimals (a tenth of a pixel on a 100,000-pixel side)."""
    xs = np.clip(points[:, 0] * (100.0 / width), 0.0, 100.0)
    ys = np.clip(points[:, 1] * (100.0 / height), 0.0, 100.0)
    return [[round(float(x), 4), round(float(y), 4)] for x, y in zip(xs, ys, strict=True)]
