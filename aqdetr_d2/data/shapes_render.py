"""
Rendering of one synthetic "shapes" scene: a textured background with 1-6 coloured shapes.

Only integer arithmetic, + - * / and sqrt (all exactly rounded by IEEE 754) are applied to
the random draws; sin/cos/exp are avoided because C math libraries and numpy's SIMD kernels
may round them differently. So the pixels depend on nothing but the random stream.
"""
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

__all__ = ["SHAPES_CLASSES", "IMAGE_SIZE", "ShapeObject", "render_scene"]

SHAPES_CLASSES = ("circle", "square", "triangle", "star", "cross")
IMAGE_SIZE = 128
MAX_OBJECTS = 6
# Longer side of an object's box, in pixels.
MIN_BOX_SIDE, MAX_BOX_SIDE = 10.0, 60.0
# Largest elongation of a shape; 1.5 keeps circles and squares recognisable as such.
MAX_STRETCH = 1.5
# At most this fraction of an object's box may lie under the boxes of later objects, so
# every annotated object keeps most of its extent visible.
MAX_COVERED_FRACTION = 0.35
PLACEMENT_TRIES = 20
# Candidate colours drawn per object; the first that stands out from what lies under it wins.
COLOUR_TRIES = 8
MIN_COLOUR_DISTANCE = 160  # L1 distance over RGB
PIXEL_NOISE = 8  # uniform per-pixel noise amplitude, so no region is perfectly flat


def _star_polygon(inner_radius=0.45):
    """A five-pointed star, pointing up; its vertices alternate between radius 1 and inner."""
    # Step by 36 degrees with a rotation matrix built from the exact cos 36 = (1 + sqrt 5) / 4.
    cos = (1.0 + math.sqrt(5.0)) / 4.0
    sin = math.sqrt(1.0 - cos * cos)
    vertices, x, y = [], 0.0, -1.0
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else inner_radius
        vertices.append((radius * x, radius * y))
        x, y = cos * x - sin * y, sin * x + cos * y
    return np.array(vertices)


def _cross_polygon(arm=0.32):
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
         (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )  # fmt: skip


# Outlines in a [-1, 1] x [-1, 1] frame; the circle is drawn from its implicit equation.
_POLYGONS = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": np.array([(0, -1), (1, 0.8), (-1, 0.8)], dtype=np.float64),
    "star": _star_polygon(),
    "cross": _cross_polygon(),
}


def _polygon_area(vertices):
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


_UNIT_AREAS = {name: _polygon_area(v) for name, v in _POLYGONS.items()}
_UNIT_AREAS["circle"] = math.pi


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its class index into SHAPES_CLASSES, tight XYXY box and area."""

    category: int
    box: Tuple[float, float, float, float]
    area: float


@dataclass(frozen=True)
class _Geometry:
    """Maps the unit frame to the image: p = center + R(angle) @ diag(scale_x, scale_y) @ q."""

    name: str
    center_x: float
    center_y: float
    scale_x: float
    scale_y: float
    cos: float
    sin: float

    def to_local(self, xs, ys):
        dx, dy = xs - self.center_x, ys - self.center_y
        u = (self.cos * dx + self.sin * dy) / self.scale_x
        v = (self.cos * dy - self.sin * dx) / self.scale_y
        return u, v


def _extent(name, scale_x, scale_y, cos, sin):
    """Tight box of the shape centred at the origin, as (x0, y0, x1, y1)."""
    if name == "circle":
        half_w = math.sqrt((cos * scale_x) ** 2 + (sin * scale_y) ** 2)
        half_h = math.sqrt((sin * scale_x) ** 2 + (cos * scale_y) ** 2)
        return -half_w, -half_h, half_w, half_h
    u, v = _POLYGONS[name][:, 0] * scale_x, _POLYGONS[name][:, 1] * scale_y
    xs, ys = cos * u - sin * v, sin * u + cos * v
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def _random_direction(rng):
    """A uniformly distributed unit vector (cos, sin), by rejection sampling in the disc."""
    while True:
        x, y = 2.0 * rng.random_sample(2) - 1.0
        norm2 = x * x + y * y
        if 1e-4 < norm2 <= 1.0:  # the lower bound keeps the division well conditioned
            norm = math.sqrt(norm2)
            return x / norm, y / norm


def _sample_object(rng, category, size):
    """Draws the shape's pose and returns its geometry and tight box inside the image."""
    name = SHAPES_CLASSES[category]
    stretch = 1.0 + (MAX_STRETCH - 1.0) * rng.random_sample()
    scale_x, scale_y = (stretch, 1.0) if rng.random_sample() < 0.5 else (1.0, stretch)
    cos, sin = _random_direction(rng)
    x0, y0, x1, y1 = _extent(name, scale_x, scale_y, cos, sin)
    # Scale so that the longer box side is the sampled object size.
    side = MIN_BOX_SIDE + (MAX_BOX_SIDE - MIN_BOX_SIDE) * rng.random_sample()
    k = side / max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 * k, y0 * k, x1 * k, y1 * k
    left = (size - (x1 - x0)) * rng.random_sample()
    top = (size - (y1 - y0)) * rng.random_sample()
    geometry = _Geometry(name, left - x0, top - y0, scale_x * k, scale_y * k, cos, sin)
    # Rounded once here so that the drawn shape and its annotation agree exactly.
    box = tuple(round(c, 2) for c in (left, top, left + (x1 - x0), top + (y1 - y0)))
    return geometry, box


def _inside(geometry, u, v):
    if geometry.name == "circle":
        return u * u + v * v <= 1.0
    # Even-odd rule: count the outline edges crossed by a ray towards +u.
    polygon = _POLYGONS[geometry.name]
    inside = np.zeros(u.shape, dtype=bool)
    for (u0, v0), (u1, v1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if v0 == v1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (v0 > v) != (v1 > v)
        inside ^= crosses & (u < u0 + (v - v0) * ((u1 - u0) / (v1 - v0)))
    return inside


def _coverage(geometry, box, size):
    """Anti-aliased coverage (2x2 samples per pixel) of the shape over the pixels of its box."""
    x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
    x1, y1 = min(int(math.ceil(box[2])), size), min(int(math.ceil(box[3])), size)
    xs = x0 + (np.arange(2 * (x1 - x0)) + 0.5) / 2
    ys = y0 + (np.arange(2 * (y1 - y0)) + 0.5) / 2
    u, v = geometry.to_local(xs[None, :], ys[:, None])
    samples = _inside(geometry, u, v).reshape(y1 - y0, 2, x1 - x0, 2)
    return (slice(y0, y1), slice(x0, x1)), samples.mean(axis=(1, 3))


def _intersection(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _random_colours(rng, count, low=0, high=256):
    return rng.randint(low, high, size=(count, 3)).astype(np.float64)


def _background(rng, size):
    centres = np.arange(size) + 0.5
    kind = rng.randint(3)
    if kind == 0:
        # Smooth colour noise: a coarse random grid, bilinearly upsampled.
        cells = rng.randint(2, 9)
        grid = _random_colours(rng, (cells + 1) ** 2, 30, 226).reshape(cells + 1, cells + 1, 3)
        t = centres * (cells / size)
        i = np.minimum(t.astype(np.int64), cells - 1)
        f = (t - i)[:, None, None]
        rows = grid[i] * (1 - f) + grid[i + 1] * f
        return rows[:, i] * (1 - f[None, :, :, 0]) + rows[:, i + 1] * f[None, :, :, 0]
    cos, sin = _random_direction(rng)
    proj = cos * centres[None, :] + sin * centres[:, None]
    if kind == 1:
        # Linear gradient between two colours.
        start, end = _random_colours(rng, 2, 20, 236)
        t = ((proj - proj.min()) / (proj.max() - proj.min()))[:, :, None]
        return start * (1 - t) + end * t
    # Stripes of two related colours, so the stripe edges do not dominate the shapes' edges.
    period = 4.0 + 16.0 * rng.random_sample()
    phase = rng.random_sample()
    base = _random_colours(rng, 1, 30, 226)[0]
    other = np.clip(base + rng.randint(-60, 61, size=3), 0, 255)
    stripe = ((proj / period + phase) % 1.0 < 0.5)[:, :, None]
    return np.where(stripe, base, other)


def _pick_colour(rng, under):
    candidates = _random_colours(rng, COLOUR_TRIES)
    distances = np.abs(candidates - under).sum(axis=1)
    good = np.flatnonzero(distances >= MIN_COLOUR_DISTANCE)
    return candidates[good[0] if len(good) else int(distances.argmax())]


def render_scene(rng: np.random.RandomState, size: int = IMAGE_SIZE):
    """
    Render one scene.

    Args:
        rng: the random stream; the scene is a pure function of its state.
        size: width and height of the square image.

    Returns:
        ndarray: HxWx3 uint8 image in RGB order.
        list[ShapeObject]: the objects, in drawing order (later ones on top).
    """
    canvas = _background(rng, size)
    objects: List[ShapeObject] = []
    covered: List[float] = []
    for _ in range(rng.randint(1, MAX_OBJECTS + 1)):
        category = rng.randint(len(SHAPES_CLASSES))
        for _ in range(PLACEMENT_TRIES):
            geometry, box = _sample_object(rng, category, size)
            overlaps = [_intersection(box, o.box) for o in objects]
            if all(
                c + ov <= MAX_COVERED_FRACTION * (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])
                for o, c, ov in zip(objects, covered, overlaps)
            ):
                break
        else:
            continue  # the image is too crowded for this object; leave it out
        covered = [c + ov for c, ov in zip(covered, overlaps)] + [0.0]
        region, alpha = _coverage(geometry, box, size)
        alpha = alpha[:, :, None]
        under = (canvas[region] * alpha).sum(axis=(0, 1)) / alpha.sum()
        colour = _pick_colour(rng, under)
        canvas[region] = canvas[region] * (1 - alpha) + colour * alpha
        area = _UNIT_AREAS[geometry.name] * geometry.scale_x * geometry.scale_y
        objects.append(ShapeObject(int(category), box, round(area, 2)))
    noise = rng.randint(-PIXEL_NOISE, PIXEL_NOISE + 1, size=canvas.shape)
    image = np.clip(np.rint(canvas) + noise, 0, 255).astype(np.uint8)
    return image, objects
