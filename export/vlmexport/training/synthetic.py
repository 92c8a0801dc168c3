"""Synthetic scenes of simple shapes and questions about them (seeded, PIL only).

Two kinds of scene hold 1 to 4 objects (circle, square, triangle, star in eight colours):

* grid scenes (``random_scene``), those of the default model's held-out set: a square canvas
  of 64 to 128 pixels is a 4x4 grid of cells; each object sits in its own cell, in its own
  column, with its size (56-84% of the cell) and its place in the cell varied;
* free scenes (``free_scene``), what people draw: objects anywhere and of any size, canvases
  of any aspect and background, any shade of each colour name, turned, anti-aliased or not,
  PNG or JPEG; each variation can be held back (``Nuisances``) for a curriculum.

Every question generator only asks what the scene answers unambiguously:

* objects never overlap and no two objects share both colour and shape, so "the red circle"
  always names one object;
* "What color is the circle?" only when exactly one circle exists, "What shape is the red
  object?" only when exactly one red object exists;
* left/right and above/below only when the centres are clearly apart (``MIN_SEPARATION``);
* captions list the objects left to right, asked only when every pair of centres is apart
  horizontally (``CAPTION_SEPARATION``), so the order is well defined.

Train and evaluation sets come from different seeds (``TRAIN_SEED``, ``EVAL_SEED``).

    .venv/bin/python -m vlmexport.training.synthetic --out models/shapes-vlm/eval --seed 2 --images 150
    .venv/bin/python -m vlmexport.training.synthetic --out tests/fixtures/eval-small --images 5 --bad-lines
    .venv/bin/python -m vlmexport.training.synthetic --out . --red-circle tests/fixtures/scenes/red-circle.png
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

TRAIN_SEED = 1
EVAL_SEED = 2

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "orange": (250, 135, 15),
    "purple": (135, 45, 190),
    "pink": (250, 125, 195),
    "cyan": (20, 205, 220),
}
KINDS = ["color", "shape", "count", "position", "yesno", "caption"]
MAX_OBJECTS = 4
COLOUR_JITTER = 14  # per channel, so colour names cover a small range, not one exact value
MIN_SEPARATION = 0.12  # of the canvas side: centres closer than this are not compared
GRID = 4  # cells per side; objects take distinct columns, so left-to-right order is clear
SIZE_RANGE = (0.28, 0.42)  # object radius, in cells
SUPERSAMPLE = 3  # draw larger and downsample: anti-aliased edges, like real pictures


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # half the object's extent, pixels
    angle: float  # degrees; triangles and stars only
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]
    hard_edges: bool = False  # drawn without anti-aliasing, as a paint program's fill does
    jpeg_quality: int | None = None  # saved and read back as JPEG at this quality


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


# --- scenes -----------------------------------------------------------------------
def random_background(rng: random.Random) -> tuple[int, int, int]:
    """Light, mid-grey or dark, slightly tinted: never close to a saturated object colour."""
    base = rng.choice([rng.randint(215, 250), rng.randint(150, 185), rng.randint(15, 55)])
    return tuple(min(255, max(0, base + rng.randint(-10, 10))) for _ in range(3))


def random_canvas(rng: random.Random) -> tuple[int, int]:
    side = rng.randint(64, 128)
    return side, side


def jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)


def place(rng: random.Random, width: int, height: int, kinds: list[tuple[str, str]]) -> list[Obj]:
    """One object per cell, in distinct columns; each keeps inside its cell."""
    cell_w, cell_h = width / GRID, height / GRID
    placed = []
    for (shape, colour), column in zip(kinds, rng.sample(range(GRID), len(kinds))):
        row = rng.randrange(GRID)
        radius = rng.uniform(*SIZE_RANGE) * min(cell_w, cell_h)
        slack_x, slack_y = max(0.0, cell_w / 2 - radius - 1) / 2, max(0.0, cell_h / 2 - radius - 1) / 2
        cx = (column + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)
        cy = (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)
        angle = rng.uniform(-15, 15)
        rgb = jitter(COLOURS[colour], rng)
        # Grid squares stay upright (free scenes turn them).
        placed.append(Obj(shape, colour, cx, cy, radius, 0.0 if shape == "square" else angle, rgb))
    return placed


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    width, height = random_canvas(rng)
    n = rng.randint(1, max_objects)
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    kinds = rng.sample(pairs, n)  # distinct (shape, colour) pairs
    return Scene(width, height, random_background(rng), tuple(place(rng, width, height, kinds)))


# --- free scenes --------------------------------------------------------------------
# What people draw to try the model: shapes anywhere, of any size, on canvases of any aspect
# and background, in any shade of each colour name, turned a little, anti-aliased or not,
# saved as PNG or JPEG. Each nuisance can be held back (Nuisances), so that training meets
# them one at a time: all at once, the vision encoder never learnt shapes.

# Hue (degrees), saturation and value ranges of each colour name; they hold the grid scenes'
# colours and the values paint programs and CSS give these names.
HSV_RANGES = {
    "red": ((-10, 10), (0.75, 1.0), (0.6, 1.0)),
    "orange": ((18, 42), (0.8, 1.0), (0.85, 1.0)),
    "yellow": ((48, 62), (0.75, 1.0), (0.85, 1.0)),
    "green": ((90, 150), (0.6, 1.0), (0.4, 0.85)),
    "cyan": ((174, 192), (0.6, 1.0), (0.75, 1.0)),
    "blue": ((212, 246), (0.6, 1.0), (0.65, 1.0)),
    "purple": ((268, 305), (0.55, 1.0), (0.45, 0.85)),
    "pink": ((318, 346), (0.3, 0.65), (0.9, 1.0)),
}
FREE_SIZES = (0.06, 0.30)  # object radius, of the canvas's shorter side
EASY_SIZES = (0.12, 0.22)
FREE_TURN = 20  # degrees either way
MAX_ASPECT = 2.5
CAPTION_SEPARATION = 0.08  # of the width: captions only when every pair of centres is this far apart


@dataclass(frozen=True)
class Nuisances:
    """Which of the free scenes' variations are drawn; without one, its easy case is."""

    backgrounds: bool = True  # else white
    colour_ranges: bool = True  # else the grid scenes' colours
    sizes: bool = True  # else EASY_SIZES
    aspect: bool = True  # else square canvases
    photo: bool = True  # hard edges and JPEG; else anti-aliased PNG
    rotation: bool = True  # else upright


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = HSV_RANGES[colour]
    rgb = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return tuple(round(255 * c) for c in rgb)


def free_background(rng: random.Random) -> tuple[int, int, int]:
    """White, cream, a grey or near black, at times tinted."""
    base = rng.choice([rng.randint(238, 255), rng.randint(195, 235), rng.randint(90, 170), rng.randint(0, 50)])
    tint = rng.randint(0, 12) if rng.random() < 0.4 else 0
    return tuple(min(255, max(0, base + rng.randint(-tint, tint))) for _ in range(3))


def free_canvas(rng: random.Random, aspect: bool) -> tuple[int, int]:
    """The longer side 120-240 pixels (the processor squashes every picture into one tile)."""
    longer = rng.randint(120, 240)
    ratio = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))) if aspect else 1.0
    if ratio >= 1:
        return longer, max(24, round(longer / ratio))
    return max(24, round(longer * ratio)), longer


def free_objects(rng: random.Random, width: int, height: int, kinds, nuisances: Nuisances) -> list[Obj]:
    """Objects anywhere inside the canvas, never touching (kept apart by their turned extent)."""
    lo, hi = FREE_SIZES if nuisances.sizes else EASY_SIZES
    placed: list[Obj] = []
    for shape, colour in kinds:
        for _ in range(50):
            radius = rng.uniform(lo, hi) * min(width, height)
            reach = 1.25 * radius + 1
            if 2 * reach >= min(width, height):
                continue
            cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
            if all(math.hypot(cx - o.cx, cy - o.cy) > reach + 1.25 * o.radius + 2 for o in placed):
                angle = rng.uniform(-FREE_TURN, FREE_TURN) if nuisances.rotation else 0.0
                rgb = shade(colour, rng) if nuisances.colour_ranges else jitter(COLOURS[colour], rng)
                placed.append(Obj(shape, colour, cx, cy, radius, angle, rgb))
                break
    return placed


def free_scene(rng: random.Random, nuisances: Nuisances = Nuisances(), max_objects: int = MAX_OBJECTS) -> Scene:
    width, height = free_canvas(rng, nuisances.aspect)
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    kinds = rng.sample(pairs, rng.randint(1, max_objects))  # distinct (shape, colour) pairs
    objects = free_objects(rng, width, height, kinds, nuisances)
    background = free_background(rng) if nuisances.backgrounds else (255, 255, 255)
    hard = nuisances.photo and rng.random() < 0.3
    quality = rng.randint(35, 90) if nuisances.photo and rng.random() < 0.4 else None
    return Scene(width, height, background, tuple(objects), hard, quality)


# --- drawing ----------------------------------------------------------------------
def polygon(
    cx: float, cy: float, radius: float, angle: float, points: int, inner: float | None
) -> list[tuple[float, float]]:
    """Regular polygon (inner=None) or star (inner radius ratio), pointing up, rotated by angle."""
    count = 2 * points if inner else points
    out = []
    for i in range(count):
        r = radius * (inner if inner and i % 2 else 1.0)
        a = math.radians(angle) - math.pi / 2 + i * 2 * math.pi / count
        out.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return out


def outline(obj: Obj) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """The object's shape in canvas pixels: a polygon, or a box for circles and squares."""
    r = obj.radius
    if obj.shape == "circle":
        return (obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r)
    if obj.shape == "square":
        h = r * 0.85  # a square of the same extent looks bigger than a circle
        if obj.angle == 0.0:
            return (obj.cx - h, obj.cy - h, obj.cx + h, obj.cy + h)
        return polygon(obj.cx, obj.cy, h * math.sqrt(2), obj.angle + 45, 4, None)
    if obj.shape == "triangle":
        # Lowered a little: a triangle's centroid sits below the middle of its box.
        return polygon(obj.cx, obj.cy + 0.15 * r, 1.1 * r, obj.angle, 3, None)
    return polygon(obj.cx, obj.cy, 1.1 * r, obj.angle, 5, 0.45)


def fill(draw: ImageDraw.ImageDraw, obj: Obj, sx: float, sy: float, colour) -> None:
    """Draw the object's shape scaled by (sx, sy)."""
    shape = outline(obj)
    if isinstance(shape, tuple):
        x0, y0, x1, y1 = shape
        (draw.ellipse if obj.shape == "circle" else draw.rectangle)([x0 * sx, y0 * sy, x1 * sx, y1 * sy], fill=colour)
    else:
        draw.polygon([(x * sx, y * sy) for x, y in shape], fill=colour)


def render(scene: Scene) -> Image.Image:
    s = 1 if scene.hard_edges else SUPERSAMPLE
    image = Image.new("RGB", (scene.width * s, scene.height * s), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill(draw, obj, s, s, obj.rgb)
    if s > 1:
        image = image.resize((scene.width, scene.height), Image.Resampling.LANCZOS)
    if scene.jpeg_quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=scene.jpeg_quality)
    return Image.open(buffer).convert("RGB")


def object_map(scene: Scene, size: int) -> Image.Image:
    """Which object covers each pixel of the scene squashed to size x size (0 = background,
    i + 1 = scene.objects[i]): the layout the image processor gives the vision encoder."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        fill(draw, obj, size / scene.width, size / scene.height, i + 1)
    return image


# --- questions --------------------------------------------------------------------
def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def referent(scene: Scene, obj: Obj) -> str:
    """The shortest unambiguous name: 'circle' if it is the only one, else 'red circle'."""
    same_shape = sum(o.shape == obj.shape for o in scene.objects)
    return obj.shape if same_shape == 1 else obj.name


def caption(scene: Scene) -> str:
    names = [article(o.name) for o in sorted(scene.objects, key=lambda o: o.cx)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


COLOUR_TEMPLATES = ("What color is the {}?", "What colour is the {}?", "Which color is the {}?")
SHAPE_TEMPLATES = ("What shape is the {} object?", "What is the shape of the {} object?", "Which shape is {}?")


def attribute_questions(scene: Scene, kind: str, named_by: str, asked: str, templates: tuple[str, ...]) -> list[QA]:
    """Ask for attribute `asked` of every object that attribute `named_by` names uniquely."""
    out = []
    for obj in scene.objects:
        name = getattr(obj, named_by)
        if sum(getattr(o, named_by) == name for o in scene.objects) == 1:
            out += [QA(kind, tpl.format(name), getattr(obj, asked)) for tpl in templates]
    return out


def matching(scene: Scene, **attrs: str) -> tuple[int, ...]:
    """Indices of the objects whose attributes equal attrs (all objects for none)."""
    return tuple(i for i, o in enumerate(scene.objects) if all(getattr(o, k) == v for k, v in attrs.items()))


def count_questions(scene: Scene, rng: random.Random) -> list[QA]:
    n = str(len(scene.objects))
    out = [QA("count", "How many shapes are there?", n), QA("count", "How many objects are in the image?", n)]
    shape = rng.choice(SHAPES)
    out.append(QA("count", f"How many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects))))
    colour = rng.choice(list(COLOURS))
    out.append(QA("count", f"How many {colour} shapes are there?", str(sum(o.colour == colour for o in scene.objects))))
    return out


def position_questions(scene: Scene) -> list[QA]:
    out = []
    w, h = scene.width, scene.height
    for obj in scene.objects:
        ref = referent(scene, obj)
        if abs(obj.cx - w / 2) >= MIN_SEPARATION * w:
            side = "left" if obj.cx < w / 2 else "right"
            out.append(QA("position", f"Is the {ref} on the left or the right?", side))
        if abs(obj.cy - h / 2) >= MIN_SEPARATION * h:
            side = "top" if obj.cy < h / 2 else "bottom"
            out.append(QA("position", f"Is the {ref} at the top or the bottom?", side))
        for other in scene.objects:
            if other is obj:
                continue
            other_ref = referent(scene, other)
            if abs(obj.cx - other.cx) >= MIN_SEPARATION * w:
                side = "left" if obj.cx < other.cx else "right"
                out.append(QA("position", f"Is the {ref} to the left or to the right of the {other_ref}?", side))
            if abs(obj.cy - other.cy) >= MIN_SEPARATION * h:
                side = "above" if obj.cy < other.cy else "below"
                out.append(QA("position", f"Is the {ref} above or below the {other_ref}?", side))
    return out


def yesno_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One yes and one no question about a (colour, shape) pair and about a shape alone.

    Half of the "no" pairs are near misses (the colour or the shape is present, not together),
    so the answer needs the binding of colour to shape, not just one of them.
    """
    present = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = rng.choice(sorted(present))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in scene.objects)]
    no_colour, no_shape = rng.choice(near if near and rng.random() < 0.5 else absent)
    tpl = rng.choice(["Is there {}?", "Is there {} in the image?"])
    out = [
        QA("yesno", tpl.format(article(f"{colour} {shape}")), "yes"),
        QA("yesno", tpl.format(article(f"{no_colour} {no_shape}")), "no"),
    ]
    shapes = {o.shape for o in scene.objects}
    missing = [s for s in SHAPES if s not in shapes]
    out.append(QA("yesno", f"Is there {article(rng.choice(sorted(shapes)))}?", "yes"))
    if missing:
        out.append(QA("yesno", f"Is there {article(rng.choice(missing))}?", "no"))
    return out


def caption_questions(scene: Scene) -> list[QA]:
    xs = sorted(o.cx for o in scene.objects)
    if any(b - a < CAPTION_SEPARATION * scene.width for a, b in zip(xs, xs[1:])):
        return []  # no clear left-to-right order
    text = caption(scene)
    return [QA("caption", "Describe the image.", text), QA("caption", "What is in the image?", text)]


def questions_by_kind(scene: Scene, rng: random.Random) -> dict[str, list[QA]]:
    """Every unambiguous question about the scene, grouped by kind (empty kinds left out)."""
    groups = {
        "color": attribute_questions(scene, "color", "shape", "colour", COLOUR_TEMPLATES),
        "shape": attribute_questions(scene, "shape", "colour", "shape", SHAPE_TEMPLATES),
        "count": count_questions(scene, rng),
        "position": position_questions(scene),
        "yesno": yesno_questions(scene, rng),
        "caption": caption_questions(scene),
    }
    return {k: v for k, v in groups.items() if v}


def sample_questions(scene: Scene, rng: random.Random, k: int, weights: dict[str, float]) -> list[QA]:
    """k questions of distinct kinds, kinds drawn by weight among those the scene allows."""
    groups = questions_by_kind(scene, rng)
    kinds = [kind for kind in KINDS if kind in groups]
    chosen: list[QA] = []
    while kinds and len(chosen) < k:
        kind = rng.choices(kinds, weights=[weights.get(x, 1.0) for x in kinds])[0]
        kinds.remove(kind)
        chosen.append(rng.choice(groups[kind]))
    return chosen


# --- evaluation set -----------------------------------------------------------------
# Appended by --bad-lines: the test set of `vlmserve eval`'s error handling.
BAD_LINES = [
    '{"image": "images/0000.png", "question": "What color is the square?", "answers": ["blue"',
    '{"image": "images/missing.png", "question": "What color is the circle?", "answers": ["red"], "kind": "color"}',
]


def write_eval_set(out: Path, seed: int, n_images: int, per_image: int, bad_lines: bool = False) -> int:
    """images/NNNN.png and eval.jsonl, one line per question:
    {"image": "images/0001.png", "question": ..., "answers": [...], "kind": ...}
    The first images of a set are the same whatever n_images is (one generator, in order).
    """
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        scene = random_scene(rng)
        name = f"images/{i:04d}.png"
        render(scene).save(out / name, optimize=True)
        for qa in sample_questions(scene, rng, per_image, {}):
            lines.append({"image": name, "question": qa.question, "answers": [qa.answer], "kind": qa.kind})
    text = [json.dumps(line) for line in lines] + (BAD_LINES if bad_lines else [])
    (out / "eval.jsonl").write_text("".join(line + "\n" for line in text))
    return len(text)


def red_circle() -> Scene:
    """The scene of the README's and the browser test's question ("What color is the circle?"):
    one red circle in the middle of a grid cell (row 1, column 1), as the scenes place objects."""
    cell = 96 / GRID
    obj = Obj("circle", "red", cx=1.5 * cell, cy=1.5 * cell, radius=0.35 * cell, angle=0.0, rgb=COLOURS["red"])
    return Scene(96, 96, (235, 235, 235), (obj,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--per-image", type=int, default=4, help="questions per image (distinct kinds)")
    parser.add_argument("--bad-lines", action="store_true", help="append a malformed line and a missing image")
    parser.add_argument("--red-circle", type=Path, help="only write the red circle scene to this PNG file")
    args = parser.parse_args()
    if args.red_circle:
        render(red_circle()).save(args.red_circle, optimize=True)
        return
    n = write_eval_set(args.out, args.seed, args.images, args.per_image, args.bad_lines)
    print(f"wrote {n} items about {args.images} images to {args.out}")


if __name__ == "__main__":
    main()
