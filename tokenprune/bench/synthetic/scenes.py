"""Synthetic scenes: a few coloured shapes on varied backgrounds, drawn with PIL, deterministic from a seed.

A :class:`Scene` is a list of :class:`Shape` objects (colour, shape, size class, centre, radius) on a background
(gradient, low-contrast noise, stripes or checks in muted colours). ``render`` draws the RGB image and, for
training the vision tower, a per-patch label map (which object covers most of each patch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from tokenprune.tiny_models import SYNTH_PROMPT

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16 x 16 = 256 visual tokens

COLORS = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "purple": (145, 45, 195),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
SMALL_RADIUS = (9, 12)   # half-width in pixels: a small object spans about 1.3 - 1.7 patches
LARGE_RADIUS = (20, 30)
MAX_OBJECTS = 4
TOP_BAND = 56            # an object "at the top" has its centre above this line ...
TOP_GAP = 90             # ... and every other object's centre is below this one


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    x: float
    y: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    objects: list[Shape]
    background: dict = field(default_factory=dict)


def _overlaps(objects: list[Shape], x: float, y: float, r: float, pad: float = 6) -> bool:
    return any(math.hypot(o.x - x, o.y - y) < o.r + r + pad for o in objects)


def sample_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene: 1-``max_objects`` objects, no overlaps; in a third of the scenes one object sits alone at the
    top."""
    n = int(rng.integers(1, max_objects + 1))
    top_scene = rng.random() < 1 / 3
    objects: list[Shape] = []
    for i in range(n):
        for _ in range(200):
            size = SIZES[int(rng.random() < 0.55)]  # 45% small, 55% large
            lo, hi = SMALL_RADIUS if size == "small" else LARGE_RADIUS
            r = float(rng.uniform(lo, hi))
            x = float(rng.uniform(r + 4, IMAGE_SIZE - r - 4))
            if top_scene and i == 0:
                y = float(rng.uniform(max(r + 4, 12), TOP_BAND - 6))
            elif top_scene:
                y = float(rng.uniform(max(TOP_GAP, r + 4), IMAGE_SIZE - r - 4))
            else:
                y = float(rng.uniform(r + 4, IMAGE_SIZE - r - 4))
            if not _overlaps(objects, x, y, r):
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                objects.append(Shape(color, shape, size, x, y, r))
                break
    background = {
        "kind": ["gradient", "noise", "stripes", "checks"][int(rng.integers(4))],
        "base": rng.uniform(150, 235, 3).tolist(),
        "tint": rng.uniform(-35, 35, 3).tolist(),
        "period": int(rng.integers(10, 40)),
        "angle": float(rng.uniform(0, math.pi)),
        "seed": int(rng.integers(2**31)),
    }
    return Scene(objects, background)


def _background(bg: dict) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    base, tint = np.array(bg["base"]), np.array(bg["tint"])
    if bg["kind"] == "gradient":
        t = np.cos(bg["angle"]) * x + np.sin(bg["angle"]) * y
        img = base + tint * (2 * t[..., None] - 1)
    elif bg["kind"] == "stripes":
        t = (np.cos(bg["angle"]) * x + np.sin(bg["angle"]) * y) * IMAGE_SIZE / bg["period"]
        img = base + tint * np.sign(np.sin(2 * np.pi * t))[..., None] * 0.6
    elif bg["kind"] == "checks":
        cx = np.floor(x * IMAGE_SIZE / bg["period"]) + np.floor(y * IMAGE_SIZE / bg["period"])
        img = base + tint * (2 * (cx % 2) - 1)[..., None] * 0.5
    else:
        img = base + np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1))
    noise = np.random.default_rng(bg["seed"]).normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _outline(o: Shape) -> tuple[str, list]:
    x, y, r = o.x, o.y, o.r
    if o.shape == "circle":
        return "ellipse", [x - r, y - r, x + r, y + r]
    if o.shape == "square":
        s = r * 0.9
        return "polygon", [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if o.shape == "triangle":
        return "polygon", [(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)]
    return "polygon", [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]  # diamond


def render(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background(scene.background))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        kind, xy = _outline(o)
        getattr(draw, kind)(xy, fill=COLORS[o.color])
    return image


def patch_labels(scene: Scene, min_cover: float = 0.15) -> np.ndarray:
    """``(GRID*GRID,)`` int: 1 + index of the object covering most of each patch (at least ``min_cover``), else 0."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        kind, xy = _outline(o)
        getattr(draw, kind)(xy, fill=i + 1)
    m = np.asarray(mask)
    onehot = np.stack([m == i for i in range(len(scene.objects) + 1)], 0).astype(np.float32)
    cover = onehot.reshape(-1, GRID, PATCH, GRID, PATCH).mean((2, 4)).reshape(len(scene.objects) + 1, -1)
    cover[0] = min_cover  # background wins unless an object covers at least min_cover of the patch
    return cover.argmax(0)


def synthetic_demo() -> tuple[Image.Image, str, str]:
    """``(image, prompt, expected answer)``: a fixed scene for the demo and the notebooks (drawn, not sampled from
    the test split): a red circle alone at the top, three large shapes below; the question asks about the
    object at the top, the image region that in-LLM pruning is known to lose (FEATHER, 2024)."""
    scene = Scene(
        objects=[
            Shape("red", "circle", "large", 150.0, 34.0, 22.0),
            Shape("blue", "square", "large", 60.0, 150.0, 28.0),
            Shape("green", "triangle", "large", 165.0, 170.0, 26.0),
            Shape("yellow", "diamond", "small", 110.0, 110.0, 11.0),
        ],
        background={"kind": "gradient", "base": [200.0, 205.0, 215.0], "tint": [20.0, -15.0, 10.0], "period": 20,
                    "angle": 0.7, "seed": 7},
    )
    return render(scene), SYNTH_PROMPT.format(question="what color is the object at the top ?"), "red"
