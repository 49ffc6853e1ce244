"""Seeded scenes of one to three coloured shapes at named positions, and the pictures of them.

A scene is a small, exact description (which shape, which colour, which cell of a 3 x 3 grid) plus drawing details
(where inside the cell, how big, how dark the background) that no text mentions. Within a scene every shape has its
own colour, kind and cell, so questions such as "what color is the circle?" have exactly one answer. Positions are
named from the viewer's side, so an image must never be mirrored (no horizontal flip in the training transform).
"""
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 200),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
}
KINDS = ("circle", "square", "triangle", "diamond")
# The 3 x 3 grid in reading order: index // 3 is the row, index % 3 the column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MAX_SHAPES = 3
MIN_IMAGE_SIZE = 36  # a grid cell of 12 px still holds a recognisable shape
MAX_SCENES = 100_000  # far below the ~440k distinct scenes, so drawing unique ones stays quick

_SCALE_RANGE = (0.55, 0.8)  # shape radius as a fraction of half a cell
_OFFSET_RANGE = (-0.6, 0.6)  # short of the cell's edge, so no shape seems to sit in the next cell
_BACKGROUND_RANGE = (30, 80)  # grey level


@dataclass(frozen=True)
class Shape:
    color: str
    kind: str
    position: str
    offset_x: float  # -1..1: where inside its cell, as a fraction of the margin the shape leaves free
    offset_y: float
    scale: float

    def geometry(self, image_size):
        """Centre (x, y) and radius in pixels of this shape in an image of ``image_size`` pixels."""
        cell = image_size / 3
        row, column = divmod(POSITIONS.index(self.position), 3)
        radius = self.scale * cell / 2
        margin = cell / 2 - radius
        return ((column + 0.5) * cell + self.offset_x * margin, (row + 0.5) * cell + self.offset_y * margin, radius)


@dataclass(frozen=True)
class Scene:
    shapes: tuple  # Shape, in the reading order of their cells
    background: int

    def signature(self):
        """What text can say about the scene: the set of (color, kind, position)."""
        return frozenset((s.color, s.kind, s.position) for s in self.shapes)


def _random_scene(rng):
    count = rng.randint(1, MAX_SHAPES)
    positions = sorted(rng.sample(range(len(POSITIONS)), count))
    colors = rng.sample(sorted(COLORS), count)
    kinds = rng.sample(KINDS, count)
    shapes = tuple(
        Shape(color, kind, POSITIONS[position], rng.uniform(*_OFFSET_RANGE), rng.uniform(*_OFFSET_RANGE),
              rng.uniform(*_SCALE_RANGE))
        for position, color, kind in zip(positions, colors, kinds))
    return Scene(shapes, rng.randint(*_BACKGROUND_RANGE))


def generate_scenes(n, seed=0):
    """``n`` scenes, all with different signatures (so no two caption sets coincide), the same for the same seed."""
    if not 0 <= n <= MAX_SCENES:
        raise ValueError(f"number of scenes must be between 0 and {MAX_SCENES}, got {n}")
    rng = random.Random(seed)
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = _random_scene(rng)
        if scene.signature() not in seen:
            seen.add(scene.signature())
            scenes.append(scene)
    return scenes


def _outline(kind, x, y, r):
    if kind == "square":
        half = 0.85 * r  # about the area of the circle
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if kind == "triangle":
        return [(x, y - r), (x + 0.95 * r, y + 0.8 * r), (x - 0.95 * r, y + 0.8 * r)]
    if kind == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    raise ValueError(f"unknown shape kind '{kind}': one of {', '.join(KINDS)}")


def render(scene, image_size=96):
    """The scene as an RGB PIL image of ``image_size`` x ``image_size`` pixels."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y, r = shape.geometry(image_size)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon(_outline(shape.kind, x, y, r), fill=fill)
    return image
