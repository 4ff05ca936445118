"""Seeded synthetic vision data: coloured shapes on noisy backgrounds, with exact boxes and per-pixel masks.

One generator serves detection (boxes + classes) and segmentation (class-id masks, instance masks). Each shape is
drawn into its own instance mask first; the image gets the same pixels, then noise. Boxes are the tight extent of
each shape's visible pixels, so boxes, masks and pixels agree exactly. Shape colours are drawn independently of
the class, so a model must learn geometry (round, square, pointed), not colour. The same seed gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")


@dataclass
class ShapeSample:
    """One image. `boxes` are COCO [x, y, width, height] in pixels (x, y of the top-left pixel, extent inclusive of
    the last pixel); `labels` index the `classes` given to `make_shapes`; `instance_masks[k]` is shape k's visible
    pixels; `mask` holds 0 for background and label + 1 for each shape pixel."""

    image: Image.Image
    boxes: np.ndarray  # (k, 4) float32
    labels: np.ndarray  # (k,) int64
    instance_masks: np.ndarray  # (k, H, W) bool
    mask: np.ndarray  # (H, W) uint8
    classes: tuple = field(default=SHAPE_CLASSES)


def make_shapes(
    n: int,
    image_size: int = 96,
    seed: int = 0,
    classes: tuple | list = SHAPE_CLASSES,
    max_shapes: int = 3,
    empty_fraction: float = 0.0,
    radius_range: tuple[float, float] = (0.1, 0.22),
    noise_std: float = 12.0,
    overlap: float = 0.0,
) -> list[ShapeSample]:
    """`n` samples of 1..`max_shapes` non-overlapping shapes (a fraction `empty_fraction` has none: negatives).

    `classes` may be any subset/order of "circle", "square", "triangle", "pentagon", "hexagon", "star".
    `overlap` > 0 (instance segmentation): about half the shapes are placed touching or overlapping an earlier one
    of the same class, by up to this fraction of their radii summed; later shapes occlude earlier ones, and every
    instance mask, box and the class mask hold only visible pixels.
    """
    unknown = [c for c in classes if c not in _CORNERS]
    if unknown:
        raise ValueError(f"Unknown shape class(es) {unknown}; choose from {sorted(_CORNERS)}.")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        count = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_shapes + 1))
        samples.append(_one_sample(rng, image_size, tuple(classes), count, radius_range, noise_std, overlap))
    return samples


# Polygon corner count per class; 0 = ellipse, negative = star with that many points.
_CORNERS = {"circle": 0, "square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "star": -5}


def _one_sample(
    rng, size: int, classes: tuple, count: int, radius_range, noise_std: float, overlap: float = 0.0
) -> ShapeSample:
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, r): keeps shapes apart so every box is whole
    masks, labels = [], []
    placed_labels: list[int] = []
    for _ in range(count):
        label = int(rng.integers(0, len(classes)))
        neighbour = int(rng.integers(0, len(placed))) if overlap > 0 and placed and rng.random() < 0.5 else None
        if neighbour is not None:
            label = placed_labels[neighbour]
            spot = _next_to(rng, size, placed[neighbour], radius_range, overlap)
            if spot is None:
                continue
            cx, cy, radius = spot
        else:
            for _attempt in range(20):
                radius = rng.uniform(*radius_range) * size
                cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
                if all(np.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                    break
            else:
                continue  # no room left: fewer shapes in this image
        placed.append((cx, cy, radius))
        placed_labels.append(label)
        instance = Image.new("L", (size, size), 0)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(ImageDraw.Draw(instance), classes[label], cx, cy, radius, rng, 255)
        pixels = np.asarray(instance) > 0
        if not pixels.any():
            continue
        draw.bitmap((0, 0), instance, fill=colour)
        masks = [earlier & ~pixels for earlier in masks]  # occluded by the new shape
        masks.append(pixels)
        labels.append(label)
    visible = [i for i, m in enumerate(masks) if m.any()]
    masks, labels = [masks[i] for i in visible], [labels[i] for i in visible]
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, noise_std, (size, size, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    instance_masks = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    semantic = np.zeros((size, size), np.uint8)
    for pixels, label in zip(masks, labels):
        semantic[pixels] = label + 1
    return ShapeSample(
        image=image,
        boxes=np.array([_tight_box(m) for m in masks], np.float32).reshape(-1, 4),
        labels=np.array(labels, np.int64),
        instance_masks=instance_masks,
        mask=semantic,
        classes=classes,
    )


def _next_to(rng, size: int, other: tuple, radius_range, overlap: float):
    """A (cx, cy, radius) inside the image whose shape touches or overlaps the shape `other` (cx, cy, r)."""
    x, y, r = other
    for _attempt in range(20):
        radius = rng.uniform(*radius_range) * size
        distance = (radius + r) * rng.uniform(1 - overlap, 1.0)
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = x + distance * np.cos(angle), y + distance * np.sin(angle)
        if radius + 1 < cx < size - radius - 1 and radius + 1 < cy < size - radius - 1:
            return cx, cy, radius
    return None


def _tight_box(pixels: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(pixels)
    x0, y0 = cols.min(), rows.min()
    return [float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)]


def _background(rng, size: int) -> Image.Image:
    """A smooth two-colour gradient: varied, but never a shape."""
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    pixels = start * (1 - ramp) + end * ramp
    if rng.random() < 0.5:
        pixels = pixels.transpose(1, 0, 2)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(pixels, (size, size, 3))).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, radius: float, rng, fill) -> None:
    corners = _CORNERS[name]
    if corners == 0:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        return
    angle = rng.uniform(0, 2 * np.pi)
    if corners > 0:
        points = [_polar(cx, cy, radius, angle + 2 * np.pi * k / corners) for k in range(corners)]
    else:  # star: alternate outer and inner radius
        tips = -corners
        points = [
            _polar(cx, cy, radius if k % 2 == 0 else radius * 0.45, angle + np.pi * k / tips) for k in range(2 * tips)
        ]
    draw.polygon(points, fill=fill)


def _polar(cx: float, cy: float, radius: float, angle: float) -> tuple[float, float]:
    return (cx + radius * np.cos(angle), cy + radius * np.sin(angle))
