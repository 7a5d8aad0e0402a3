"""Drawing one synthetic organism: its polygons, pose, background, part map and trait masks.

Shapes are polygons in the organism's own frame (body length 1, head towards +x, dorsal side
up), posed (position, scale, rotation, flip) onto a cluttered background. The same layers
fill the image, the part map and the pose-free part map, so every pixel's part is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptcam.data.masks import DEMO_LEVELS
from promptcam.demo.taxa import (
    BACKGROUND,
    BODY,
    DORSAL,
    HEAD,
    MARKING,
    PART_NAMES,
    PELVIC,
    RANK_TRAIT_PARTS,
    TAIL,
    OrganismSpec,
)

# Canonical organism frame: body length 1, head towards +x, dorsal side towards +y.
_BODY_HALF_LENGTH = 0.5
_HEAD_X = 0.3  # where the head's outline and the gill start
_EXTENT_X = (-0.95, 0.55)
_EXTENT_Y = (-0.5, 0.62)
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Pose:
    centre_x: float
    centre_y: float
    length: float  # body length in pixels
    angle: float  # radians, counter-clockwise
    flipped: bool

    def heading(self) -> float:
        """Direction the head points to, in radians (image x to the right, y up)."""
        return self.angle + (math.pi if self.flipped else 0.0)


@dataclass
class Rendering:
    image: np.ndarray  # (S, S, 3) uint8
    parts: np.ndarray  # (S, S) uint8, indices into PART_NAMES
    trait_mask: np.ndarray  # (S, S) uint8, bit i set inside the trait of DEMO_LEVELS[i]
    pose: Pose
    canonical_parts: np.ndarray | None = None  # (rows, cols, parts) shares, pose-free frame


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _arc(cx: float, cy: float, r: float, start: float, stop: float, n: int = 16) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _body_half_height(x: float | np.ndarray, depth: float) -> np.ndarray:
    return depth * np.sqrt(np.clip(1.0 - (np.asarray(x) / _BODY_HALF_LENGTH) ** 2, 0.0, 1.0))


def _tail_polygons(shape: str) -> list[np.ndarray]:
    root = -0.44
    if shape == "forked":
        return [np.array([[root, 0.09], [-0.9, 0.34], [-0.72, 0.0], [-0.9, -0.34], [root, -0.09]])]
    if shape == "rounded":
        fan = _arc(-0.5, 0.0, 0.34, math.radians(140), math.radians(220), n=20)
        return [np.vstack([[[root, 0.07]], fan, [[root, -0.07]]])]
    if shape == "truncate":
        return [np.array([[root, 0.08], [-0.84, 0.26], [-0.84, -0.26], [root, -0.08]])]
    if shape == "pointed":
        return [np.array([[root, 0.12], [-0.95, 0.0], [root, -0.12]])]
    if shape == "lunate":
        outer = _arc(-0.5, 0.0, 0.42, math.radians(135), math.radians(225), n=20)
        inner = _arc(-0.98, 0.0, 0.3, math.radians(-50), math.radians(50), n=20)
        return [np.vstack([[[root, 0.06]], outer, inner, [[root, -0.06]]])]
    raise ValueError(f"unknown tail shape {shape!r}")


def _dorsal_polygons(shape: str, depth: float) -> list[np.ndarray]:
    def top(x: float) -> float:
        return float(_body_half_height(x, depth)) - 0.02

    if shape == "triangle":
        return [np.array([[-0.16, top(-0.16)], [0.02, depth + 0.27], [0.14, top(0.14)]])]
    if shape == "dome":
        dome = _arc(0.0, top(0.0), 0.17, 0.0, math.pi, n=20)
        return [np.vstack([dome, [[-0.17, top(-0.17)], [0.17, top(0.17)]]])]
    if shape == "longlow":
        return [
            np.array(
                [[-0.34, top(-0.34)], [-0.3, depth + 0.09], [0.24, depth + 0.09], [0.28, top(0.28)]]
            )
        ]
    if shape == "twinspike":
        return [
            np.array([[-0.24, top(-0.24)], [-0.16, depth + 0.24], [-0.08, top(-0.08)]]),
            np.array([[0.04, top(0.04)], [0.12, depth + 0.24], [0.2, top(0.2)]]),
        ]
    if shape == "sail":
        return [
            np.array(
                [[-0.04, top(-0.04)], [-0.3, depth + 0.3], [-0.36, depth + 0.22], [-0.3, top(-0.3)]]
            )
        ]
    if shape == "comb":
        xs = np.linspace(-0.26, 0.18, 5)
        return [
            np.array([[x - 0.025, top(x - 0.025)], [x, depth + 0.2], [x + 0.025, top(x + 0.025)]])
            for x in xs
        ]
    raise ValueError(f"unknown dorsal shape {shape!r}")


def _mark_polygons(
    spec: OrganismSpec, depth: float, size: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Polygons of the marking, and holes cut out of it (for the ring)."""
    x = {"front": 0.22, "middle": 0.0, "rear": -0.24}[spec.mark_place]
    y = 0.0 if spec.mark_side == "centre" else 0.45 * float(_body_half_height(x, depth))
    r = size
    if spec.mark_shape == "disc":
        return [_ellipse(x, y, r, r)], []
    if spec.mark_shape == "ring":
        return [_ellipse(x, y, r * 1.15, r * 1.15)], [_ellipse(x, y, r * 0.55, r * 0.55)]
    if spec.mark_shape == "bar":
        half_height = 0.8 * float(_body_half_height(x, depth))
        return [
            np.array(
                [
                    [x - 0.45 * r, y - half_height],
                    [x + 0.45 * r, y - half_height],
                    [x + 0.45 * r, y + half_height],
                    [x - 0.45 * r, y + half_height],
                ]
            )
        ], []
    if spec.mark_shape == "twindot":
        return [
            _ellipse(x - 0.9 * r, y, 0.65 * r, 0.65 * r),
            _ellipse(x + 0.9 * r, y, 0.65 * r, 0.65 * r),
        ], []
    raise ValueError(f"unknown marking shape {spec.mark_shape!r}")


def _to_pixels(points: np.ndarray, pose: Pose, scale: float) -> list[tuple[float, float]]:
    xy = points.copy()
    if pose.flipped:
        xy[:, 0] = -xy[:, 0]
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    rotated_x = cos * xy[:, 0] - sin * xy[:, 1]
    rotated_y = sin * xy[:, 0] + cos * xy[:, 1]
    px = (pose.centre_x + pose.length * rotated_x) * scale
    py = (pose.centre_y - pose.length * rotated_y) * scale  # image y grows downwards
    return list(zip(px.tolist(), py.tolist(), strict=True))


def _random_colour(
    rng: np.random.Generator, avoid: np.ndarray | None = None
) -> tuple[int, int, int]:
    for _ in range(32):
        colour = rng.integers(20, 236, size=3)
        if avoid is None or np.abs(colour.astype(int) - avoid.astype(int)).sum() > 180:
            break
    return tuple(int(c) for c in colour)


def _draw_background(size: int, rng: np.random.Generator) -> Image.Image:
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    canvas = (top * (1 - ramp) + bottom * ramp) * np.ones((size, size, 1))
    image = Image.fromarray(canvas.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        colour = _random_colour(rng)
        kind = rng.integers(0, 4)
        x0, y0 = rng.uniform(-0.1, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.45, size=2) * size
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            draw.line(
                [x0, y0, x0 + w * rng.choice([-1, 1]), y0 + h],
                fill=colour,
                width=int(rng.integers(1, 5)),
            )
        else:
            pts = rng.uniform(0, 1, size=(int(rng.integers(3, 6)), 2)) * [w, h] + [x0, y0]
            draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.5))))


def _random_pose(size: int, rng: np.random.Generator) -> Pose:
    length = float(rng.uniform(0.52, 0.7)) * size
    angle = math.radians(float(rng.uniform(-30.0, 30.0)))
    flipped = bool(rng.random() < 0.5)
    # Keep the whole organism inside the frame: bound the rotated extent's corners.
    corners = np.array([[x, y] for x in _EXTENT_X for y in _EXTENT_Y])
    probe = Pose(0.0, 0.0, length, angle, flipped)
    pixels = np.array(_to_pixels(corners, probe, 1.0))
    low, high = pixels.min(axis=0), pixels.max(axis=0)
    margin = 1.0
    cx = rng.uniform(margin - low[0], max(margin - low[0], size - margin - high[0]))
    cy = rng.uniform(margin - low[1], max(margin - low[1], size - margin - high[1]))
    return Pose(float(cx), float(cy), length, angle, flipped)


_Layers = list[tuple[int, list[np.ndarray], tuple[int, int, int]]]


def _organism_layers(
    spec: OrganismSpec,
    depth: float,
    mark_size: float,
    body_colour: np.ndarray,
    fin_colour: tuple[int, int, int],
    mark_colour: tuple[int, int, int],
) -> _Layers:
    """The organism's polygons in its own frame, in painter's order, with part and colour."""
    body = _ellipse(0.0, 0.0, _BODY_HALF_LENGTH, depth, n=64)
    front = body[body[:, 0] >= _HEAD_X]
    head_outline = np.vstack(
        [
            [[_HEAD_X, float(_body_half_height(_HEAD_X, depth))]],
            front[np.argsort(-np.arctan2(front[:, 1], front[:, 0]))],
            [[_HEAD_X, -float(_body_half_height(_HEAD_X, depth))]],
        ]
    )
    pelvic = np.array([[0.05, -depth + 0.02], [-0.08, -depth - 0.12], [-0.12, -depth + 0.02]])
    marks, holes = _mark_polygons(spec, depth, mark_size)
    body_rgb = tuple(int(c) for c in body_colour)
    return [
        (TAIL, _tail_polygons(spec.tail), fin_colour),
        (DORSAL, _dorsal_polygons(spec.dorsal, depth), fin_colour),
        (PELVIC, [pelvic], fin_colour),
        (BODY, [body], body_rgb),
        (HEAD, [head_outline], tuple(int(c) for c in np.clip(body_colour * 0.85, 0, 255))),
        (MARKING, marks, mark_colour),
        (BODY, holes, body_rgb),
    ]


def canonical_part_shares(
    layers: _Layers, grid: tuple[int, int], supersample: int = 4
) -> np.ndarray:
    """Area share of each body part in each cell of a grid over the organism's own frame.

    The frame is pose-free (head towards +x, dorsal side up, body length 1), so this map
    is the organism's part geometry with position, rotation, flip and size taken out.
    Returns (rows, cols, len(PART_NAMES)) float32 shares summing to 1 per cell.
    """
    rows, cols = grid
    width, height = cols * supersample, rows * supersample
    x0, x1 = _EXTENT_X
    y0, y1 = _EXTENT_Y
    canvas = Image.new("L", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for part, polygons, _ in layers:
        for polygon in polygons:
            px = (polygon[:, 0] - x0) / (x1 - x0) * width
            py = (y1 - polygon[:, 1]) / (y1 - y0) * height
            draw.polygon(list(zip(px.tolist(), py.tolist(), strict=True)), fill=part)
    labels = np.asarray(canvas, dtype=np.int64)
    one_hot = np.eye(len(PART_NAMES), dtype=np.float32)[labels]
    return one_hot.reshape(rows, supersample, cols, supersample, -1).mean(axis=(1, 3))


def render_organism(
    spec: OrganismSpec,
    size: int,
    rng: np.random.Generator,
    canonical_grid: tuple[int, int] | None = None,
) -> Rendering:
    """Draw one organism on a cluttered background, with its part map and trait masks.

    With ``canonical_grid`` (rows, cols), also the pose-free part map
    (:func:`canonical_part_shares`); it draws no random numbers, so the image is unchanged.
    """
    background = _draw_background(size * _SUPERSAMPLE, rng)
    pose = _random_pose(size, rng)
    depth = float(rng.uniform(0.17, 0.21))
    mark_size = float(rng.uniform(0.065, 0.08))
    body_colour = np.array(_random_colour(rng))
    fin_colour = _random_colour(rng) if rng.random() < 0.5 else tuple(int(c) for c in body_colour)
    mark_colour = _random_colour(rng, avoid=body_colour)

    eye = _ellipse(0.38, 0.05, 0.03, 0.03, n=16)
    gill = np.array(
        [[_HEAD_X - 0.01, -0.6 * depth], [_HEAD_X + 0.02, 0.0], [_HEAD_X - 0.01, 0.6 * depth]]
    )
    # Painter's order; the same order fills the part map and the image.
    layers = _organism_layers(spec, depth, mark_size, body_colour, fin_colour, mark_colour)
    draw = ImageDraw.Draw(background)
    parts = Image.new("L", (size, size), BACKGROUND)
    parts_draw = ImageDraw.Draw(parts)
    for part, polygons, colour in layers:
        for polygon in polygons:
            draw.polygon(_to_pixels(polygon, pose, _SUPERSAMPLE), fill=colour)
            parts_draw.polygon(_to_pixels(polygon, pose, 1.0), fill=part)
    draw.line(_to_pixels(gill, pose, _SUPERSAMPLE), fill=(20, 20, 20), width=_SUPERSAMPLE)
    draw.polygon(_to_pixels(eye, pose, _SUPERSAMPLE), fill=(10, 10, 10))

    for _ in range(int(rng.integers(0, 4))):  # small foreground clutter, over the organism too
        x, y = rng.uniform(0, size * _SUPERSAMPLE, size=2)
        r = float(rng.uniform(1.0, 2.5)) * _SUPERSAMPLE
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_random_colour(rng))

    image = background.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, float(rng.uniform(2.0, 8.0)), size=pixels.shape)
    image_array = np.clip(pixels, 0, 255).astype(np.uint8)

    part_map = np.asarray(parts, dtype=np.uint8)
    trait_mask = np.zeros_like(part_map)
    for bit, part in enumerate(RANK_TRAIT_PARTS[level] for level in DEMO_LEVELS):
        trait_mask |= (part_map == part).astype(np.uint8) << bit
    canonical = None if canonical_grid is None else canonical_part_shares(layers, canonical_grid)
    return Rendering(
        image=image_array,
        parts=part_map,
        trait_mask=trait_mask,
        pose=pose,
        canonical_parts=canonical,
    )
