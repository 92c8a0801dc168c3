"""Synthetic scenes of simple shapes and questions about them (seeded, PIL only).

A scene holds 1 to 4 objects (circle, square, triangle, star in eight colours) of varied sizes
and positions on a varied background. Every question generator only asks what the scene answers
unambiguously:

* objects never overlap and no two objects share both colour and shape, so "the red circle"
  always names one object;
* "What color is the circle?" only when exactly one circle exists, "What shape is the red
  object?" only when exactly one red object exists;
* left/right and above/below only when the centres are clearly apart (``MIN_SEPARATION``);
* captions list the objects left to right, and every pair of centres is apart horizontally,
  so the order is well defined.

Train and evaluation sets come from different seeds (``TRAIN_SEED``, ``EVAL_SEED``).

    .venv/bin/python export/synthetic.py --out models/shapes-vlm/eval --seed 2 --images 150
"""

from __future__ import annotations

import argparse
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
CAPTION_SEPARATION = 0.08  # of the width: every pair of centres is at least this far apart in x
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
    if rng.random() < 0.7:
        return side, side
    aspect = rng.uniform(0.8, 1.25)
    return side, max(48, round(side * aspect))


def jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)


def fits(candidate: Obj, placed: list[Obj], width: int) -> bool:
    """No overlap (with a margin) and centres apart in x, so left-to-right order is clear."""
    for other in placed:
        gap = candidate.radius + other.radius + 3
        if abs(candidate.cx - other.cx) < gap and abs(candidate.cy - other.cy) < gap:
            return False
        if abs(candidate.cx - other.cx) < CAPTION_SEPARATION * width:
            return False
    return True


def place(rng: random.Random, width: int, height: int, kinds: list[tuple[str, str]]) -> list[Obj] | None:
    placed: list[Obj] = []
    short = min(width, height)
    for shape, colour in kinds:
        for _ in range(100):
            radius = rng.uniform(0.09, 0.16) * short
            obj = Obj(
                shape=shape,
                colour=colour,
                cx=rng.uniform(radius + 1, width - radius - 1),
                cy=rng.uniform(radius + 1, height - radius - 1),
                radius=radius,
                angle=rng.uniform(-15, 15),
                rgb=jitter(COLOURS[colour], rng),
            )
            if fits(obj, placed, width):
                placed.append(obj)
                break
        else:
            return None
    return placed


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    while True:
        width, height = random_canvas(rng)
        n = rng.randint(1, max_objects)
        pairs = [(s, c) for s in SHAPES for c in COLOURS]
        kinds = rng.sample(pairs, n)  # distinct (shape, colour) pairs
        objects = place(rng, width, height, kinds)
        if objects is not None:
            return Scene(width, height, random_background(rng), tuple(objects))


# --- drawing ----------------------------------------------------------------------
def polygon(cx: float, cy: float, radius: float, angle: float, points: int, inner: float | None) -> list[tuple[float, float]]:
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
        return (obj.cx - h, obj.cy - h, obj.cx + h, obj.cy + h)
    if obj.shape == "triangle":
        # Lowered a little: a triangle's centroid sits below the middle of its box.
        return polygon(obj.cx, obj.cy + 0.15 * r, 1.1 * r, obj.angle, 3, None)
    return polygon(obj.cx, obj.cy, 1.1 * r, obj.angle, 5, 0.45)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    image = Image.new("RGB", (scene.width * s, scene.height * s), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        shape = outline(obj)
        if obj.shape in ("circle", "square"):
            box = [v * s for v in shape]
            (draw.ellipse if obj.shape == "circle" else draw.rectangle)(box, fill=obj.rgb)
        else:
            draw.polygon([(x * s, y * s) for x, y in shape], fill=obj.rgb)
    return image.resize((scene.width, scene.height), Image.Resampling.LANCZOS)


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


def colour_questions(scene: Scene) -> list[QA]:
    out = []
    for obj in scene.objects:
        if sum(o.shape == obj.shape for o in scene.objects) == 1:
            for tpl in ("What color is the {}?", "What colour is the {}?", "Which color is the {}?"):
                out.append(QA("color", tpl.format(obj.shape), obj.colour))
    return out


def shape_questions(scene: Scene) -> list[QA]:
    out = []
    for obj in scene.objects:
        if sum(o.colour == obj.colour for o in scene.objects) == 1:
            for tpl in ("What shape is the {} object?", "What is the shape of the {} object?", "Which shape is {}?"):
                out.append(QA("shape", tpl.format(obj.colour), obj.shape))
    return out


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
    text = caption(scene)
    return [QA("caption", "Describe the image.", text), QA("caption", "What is in the image?", text)]


def questions_by_kind(scene: Scene, rng: random.Random) -> dict[str, list[QA]]:
    """Every unambiguous question about the scene, grouped by kind (empty kinds left out)."""
    groups = {
        "color": colour_questions(scene),
        "shape": shape_questions(scene),
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
def write_eval_set(out: Path, seed: int, n_images: int, per_image: int) -> int:
    """images/NNNN.png and eval.jsonl, one line per question:
    {"image": "images/0001.png", "question": ..., "answers": [...], "kind": ...}
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
    (out / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--per-image", type=int, default=4, help="questions per image (distinct kinds)")
    args = parser.parse_args()
    n = write_eval_set(args.out, args.seed, args.images, args.per_image)
    print(f"wrote {n} items about {args.images} images to {args.out}")


if __name__ == "__main__":
    main()
