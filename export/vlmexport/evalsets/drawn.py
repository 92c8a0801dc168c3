"""Freely drawn test pictures for the default model, written apart from its training generator.

The training scenes (vlmexport.training.synthetic) are drawn with PIL from hue ranges. These
are rasterised here with numpy (coverage from 4x4 samples per pixel, or hard edges), with the
fixed colour values drawing programs offer (pure RGB primaries, CSS names, MS Paint's palette),
different shape proportions (a narrower star, an upright-centred triangle), canvases from
photo-like 4:3 to 2.5:1 banners, and PNG or JPEG files. Only the question wording is shared:
it is what the model is asked to understand.

    .venv/bin/python -m vlmexport.evalsets.drawn --out models/shapes-vlm/eval-drawn
    .venv/bin/python -m vlmexport.evalsets.drawn --examples models/shapes-vlm/package
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20261206
SHAPES = ("circle", "square", "triangle", "star")
PALETTE = {
    "red": [(255, 0, 0), (237, 28, 36)],
    "orange": [(255, 165, 0), (255, 127, 39)],
    "yellow": [(255, 255, 0), (255, 242, 0)],
    "green": [(0, 128, 0), (34, 177, 76)],
    "cyan": [(0, 255, 255), (0, 206, 209)],
    "blue": [(0, 0, 255), (65, 105, 225)],
    "purple": [(128, 0, 128), (148, 0, 211)],
    "pink": [(255, 105, 180), (255, 174, 201)],
}
BACKGROUNDS = [(255, 255, 255), (250, 248, 240), (222, 222, 222), (128, 128, 128), (32, 32, 40), (0, 0, 0)]
CANVASES = [(320, 240), (240, 320), (400, 300), (256, 256), (200, 200), (500, 200), (200, 400), (360, 180), (640, 480)]
COLOUR_QUESTIONS = ("What color is the {}?", "What colour is the {}?", "Which color is the {}?")
SHAPE_QUESTIONS = ("What shape is the {} object?", "What is the shape of the {} object?", "Which shape is {}?")
APART = 0.12  # of the canvas: objects closer than this along an axis are not compared on it


def star_points(cx, cy, r, turn):
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else 0.4 * r
        a = turn + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def regular_points(cx, cy, r, n, turn):
    return [
        (
            cx + r * math.cos(turn + k * 2 * math.pi / n - math.pi / 2),
            cy + r * math.sin(turn + k * 2 * math.pi / n - math.pi / 2),
        )
        for k in range(n)
    ]


def inside_polygon(x: np.ndarray, y: np.ndarray, pts) -> np.ndarray:
    """Even-odd rule, vectorised over sample points."""
    hit = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        hit ^= crosses & (x < at)
    return hit


def inside(obj: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy, r, turn = obj["cx"], obj["cy"], obj["r"], math.radians(obj["turn"])
    if obj["shape"] == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if obj["shape"] == "square":
        return inside_polygon(x, y, regular_points(cx, cy, r, 4, turn + math.pi / 4))
    if obj["shape"] == "triangle":
        return inside_polygon(x, y, regular_points(cx, cy, r, 3, turn))
    return inside_polygon(x, y, star_points(cx, cy, r, turn))


def rasterise(scene: dict) -> Image.Image:
    w, h = scene["width"], scene["height"]
    k = 4 if scene["smooth"] else 1
    offsets = (np.arange(k) + 0.5) / k
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    canvas = np.broadcast_to(np.array(scene["background"], dtype=np.float64), (h, w, 3)).copy()
    for obj in scene["objects"]:
        cover = np.zeros((h, w))
        for dy in offsets:
            for dx in offsets:
                cover += inside(obj, xs + dx, ys + dy)
        cover = (cover / (k * k))[..., None]
        canvas = canvas * (1 - cover) + np.array(obj["rgb"], dtype=np.float64) * cover
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def draw_scene(rng: np.random.Generator) -> dict:
    w, h = CANVASES[rng.integers(len(CANVASES))]
    n = int(rng.integers(1, 5))
    pairs = [(s, c) for s in SHAPES for c in PALETTE]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    short = min(w, h)
    while True:
        objects = []
        for shape, colour in chosen:
            for _ in range(100):
                r = float(rng.uniform(0.08, 0.30 if n < 3 else 0.22)) * short
                cx, cy = float(rng.uniform(r * 1.1, w - r * 1.1)), float(rng.uniform(r * 1.1, h - r * 1.1))
                if all(math.hypot(cx - o["cx"], cy - o["cy"]) > 1.2 * (r + o["r"]) for o in objects):
                    rgb = PALETTE[colour][rng.integers(2)]
                    turn = 0.0 if shape == "circle" or rng.random() < 0.5 else float(rng.uniform(-12, 12))
                    objects.append(dict(shape=shape, colour=colour, cx=cx, cy=cy, r=r, turn=turn, rgb=rgb))
                    break
        if len(objects) == n:
            break
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return dict(width=w, height=h, background=background, objects=objects, smooth=bool(rng.random() < 0.6))


def named(scene: dict, obj: dict) -> str:
    alone = sum(o["shape"] == obj["shape"] for o in scene["objects"]) == 1
    return obj["shape"] if alone else f"{obj['colour']} {obj['shape']}"


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def questions(scene: dict, rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    objs, w, h = scene["objects"], scene["width"], scene["height"]
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in ("color", "shape", "count", "position", "yesno", "caption")}
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            out["color"] += [(t.format(o["shape"]), o["colour"]) for t in COLOUR_QUESTIONS]
        if sum(p["colour"] == o["colour"] for p in objs) == 1:
            out["shape"] += [(t.format(o["colour"]), o["shape"]) for t in SHAPE_QUESTIONS]
    out["count"] += [
        ("How many shapes are there?", str(len(objs))),
        ("How many objects are in the image?", str(len(objs))),
    ]
    shape = SHAPES[rng.integers(4)]
    out["count"].append((f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objs))))
    colour = list(PALETTE)[rng.integers(8)]
    out["count"].append((f"How many {colour} shapes are there?", str(sum(o["colour"] == colour for o in objs))))
    for o in objs:
        name = named(scene, o)
        if abs(o["cx"] - w / 2) >= APART * w:
            out["position"].append((f"Is the {name} on the left or the right?", "left" if o["cx"] < w / 2 else "right"))
        if abs(o["cy"] - h / 2) >= APART * h:
            out["position"].append((f"Is the {name} at the top or the bottom?", "top" if o["cy"] < h / 2 else "bottom"))
        for p in objs:
            if p is o:
                continue
            if abs(o["cx"] - p["cx"]) >= APART * w:
                side = "left" if o["cx"] < p["cx"] else "right"
                out["position"].append((f"Is the {name} to the left or to the right of the {named(scene, p)}?", side))
            if abs(o["cy"] - p["cy"]) >= APART * h:
                side = "above" if o["cy"] < p["cy"] else "below"
                out["position"].append((f"Is the {name} above or below the {named(scene, p)}?", side))
    present = sorted({(o["colour"], o["shape"]) for o in objs})
    c, s = present[rng.integers(len(present))]
    out["yesno"].append((f"Is there {with_article(f'{c} {s}')}?", "yes"))
    absent = [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in present]
    c, s = absent[rng.integers(len(absent))]
    out["yesno"].append((f"Is there {with_article(f'{c} {s}')} in the image?", "no"))
    missing = [s for s in SHAPES if all(o["shape"] != s for o in objs)]
    if missing:
        out["yesno"].append((f"Is there {with_article(missing[rng.integers(len(missing))])}?", "no"))
    xs = sorted(o["cx"] for o in objs)
    if all(b - a >= 0.08 * w for a, b in zip(xs, xs[1:])):
        names = [with_article(f"{o['colour']} {o['shape']}") for o in sorted(objs, key=lambda o: o["cx"])]
        text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        out["caption"].append(("Describe the image.", text))
    return {k: v for k, v in out.items() if v}


def write(out: Path, n_images: int, per_image: int) -> int:
    rng = np.random.default_rng(SEED)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        scene = draw_scene(rng)
        picture = rasterise(scene)
        jpeg = rng.random() < 0.4
        name = f"images/{i:04d}.{'jpg' if jpeg else 'png'}"
        if jpeg:
            picture.save(out / name, quality=int(rng.integers(60, 96)))
        else:
            picture.save(out / name, optimize=True)
        groups = questions(scene, rng)
        kinds = list(groups)
        for k in rng.choice(len(kinds), size=min(per_image, len(kinds)), replace=False):
            kind = kinds[k]
            question, answer = groups[kind][rng.integers(len(groups[kind]))]
            lines.append({"image": name, "question": question, "answers": [answer], "kind": kind})
    (out / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


ABOUT = (
    "Knows circles, squares, triangles and stars in eight colours (red, orange, yellow, green, cyan, "
    "blue, purple, pink): their colours, shapes, number and places, on pictures of up to four shapes "
    "drawn anywhere, on light or dark backgrounds. It knows nothing else."
)


def picture(width, height, background, objects, smooth=True):
    """A picture of objects (shape, colour, centre x, centre y, radius, turn in degrees), in
    pixels of a width x height canvas."""
    return dict(
        width=width,
        height=height,
        background=background,
        smooth=smooth,
        objects=[
            dict(shape=shape, colour=colour, cx=cx, cy=cy, r=r, turn=turn, rgb=PALETTE[colour][1])
            for shape, colour, cx, cy, r, turn in objects
        ],
    )


# (file, picture, question): what a person trying the model might draw and ask.
EXAMPLES = [
    (
        "square-and-circle.png",
        picture(320, 240, (255, 255, 255), [("square", "blue", 95, 150, 48, 0), ("circle", "green", 235, 85, 40, 0)]),
        "What color is the square?",
    ),
    (
        "triangle.png",
        picture(480, 200, (250, 248, 240), [("triangle", "yellow", 300, 105, 60, 8)]),
        "What shape is the yellow object?",
    ),
    (
        "three-shapes.png",
        picture(
            300,
            300,
            (32, 32, 40),
            [
                ("star", "red", 70, 75, 42, 0),
                ("circle", "cyan", 175, 150, 45, 0),
                ("triangle", "purple", 240, 245, 38, 0),
            ],
        ),
        "How many shapes are there?",
    ),
    (
        "left-or-right.png",
        picture(
            400,
            300,
            (222, 222, 222),
            [("circle", "pink", 305, 95, 50, 0), ("star", "orange", 105, 205, 58, 0)],
            smooth=False,
        ),
        "Is the pink circle to the left or to the right of the orange star?",
    ),
    ("describe.jpg", picture(300, 200, (250, 248, 240), [("star", "purple", 150, 100, 60, 0)]), "Describe the image."),
]


def write_examples(package: Path) -> None:
    """package/examples/ and package/card.json: the pictures the question page offers."""
    (package / "examples").mkdir(parents=True, exist_ok=True)
    for file, scene, _ in EXAMPLES:
        picture = rasterise(scene)
        if file.endswith(".jpg"):
            picture.save(package / "examples" / file, quality=85)
        else:
            picture.save(package / "examples" / file, optimize=True)
    card = {"about": ABOUT, "examples": [{"image": file, "question": q} for file, _, q in EXAMPLES]}
    (package / "card.json").write_text(json.dumps(card, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the evaluation set's folder")
    parser.add_argument("--examples", type=Path, help="only write a package's card.json and examples/ here")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--per-image", type=int, default=5, help="questions per image, of distinct kinds")
    args = parser.parse_args()
    if args.examples:
        write_examples(args.examples)
        return
    if not args.out:
        parser.error("--out or --examples is required")
    n = write(args.out, args.images, args.per_image)
    print(f"wrote {n} items about {args.images} pictures to {args.out}")


if __name__ == "__main__":
    main()
