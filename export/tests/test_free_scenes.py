"""Free training scenes (synthetic.free_scene) and the `free` recipe's data path: each variation
can be held back, objects never touch, a picture shows each object where the scene says, and the
data worker hands over what it made, in order."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from vlmexport.training import synthetic
from vlmexport.training import train_default as td

EASY = synthetic.Nuisances(False, False, False, False, False, False)


def scenes(nuisances: synthetic.Nuisances, n: int = 300) -> list[synthetic.Scene]:
    rng = random.Random(3)
    return [synthetic.free_scene(rng, nuisances) for _ in range(n)]


def test_held_back_variations_are_drawn_in_their_easy_case():
    for scene in scenes(EASY):
        assert scene.width == scene.height and scene.background == (255, 255, 255)
        assert not scene.hard_edges and scene.jpeg_quality is None
        for obj in scene.objects:
            assert obj.angle == 0.0
            lo, hi = synthetic.EASY_SIZES
            assert lo <= obj.radius / scene.width <= hi
            base = synthetic.COLOURS[obj.colour]
            assert all(abs(a - b) <= synthetic.COLOUR_JITTER for a, b in zip(obj.rgb, base))


def test_every_variation_is_drawn():
    drawn = scenes(synthetic.Nuisances())
    objects = [(s, o) for s in drawn for o in s.objects]
    ratios = [s.width / s.height for s in drawn]
    assert min(ratios) < 1 / 2 and max(ratios) > 2
    assert {s.background for s in drawn} - {(255, 255, 255)}
    assert any(s.hard_edges for s in drawn) and any(s.jpeg_quality for s in drawn)
    assert any(abs(o.angle) > 10 for _, o in objects)
    sizes = [o.radius / min(s.width, s.height) for s, o in objects]
    assert min(sizes) < 0.08 and max(sizes) > 0.26
    # Shades beyond the grid scenes' jitter, each still of its colour's hue.
    assert any(max(abs(a - b) for a, b in zip(o.rgb, synthetic.COLOURS[o.colour])) > 40 for _, o in objects)


def test_objects_keep_inside_the_canvas_and_never_touch():
    for scene in scenes(synthetic.Nuisances()):
        assert 1 <= len(scene.objects)
        for i, a in enumerate(scene.objects):
            reach = 1.25 * a.radius
            assert reach <= a.cx <= scene.width - reach and reach <= a.cy <= scene.height - reach
            for b in scene.objects[i + 1 :]:
                assert math.hypot(a.cx - b.cx, a.cy - b.cy) > 1.25 * (a.radius + b.radius)


def test_a_picture_shows_each_object_at_its_centre_and_the_map_says_which():
    for scene in scenes(synthetic.Nuisances(photo=False), 60):
        picture = np.asarray(synthetic.render(scene)).astype(int)
        owners = np.asarray(synthetic.object_map(scene, 120))
        for i, obj in enumerate(scene.objects):
            x, y = int(obj.cx), int(obj.cy)
            assert np.abs(picture[y, x] - np.array(obj.rgb)).max() <= 12, (scene, obj)  # tiny shapes blur a little
            assert owners[int(obj.cy / scene.height * 120), int(obj.cx / scene.width * 120)] == i + 1


def test_captions_are_asked_only_when_the_left_to_right_order_is_clear():
    rng = random.Random(4)
    asked = 0
    for scene in scenes(synthetic.Nuisances()):
        groups = synthetic.questions_by_kind(scene, rng)
        xs = sorted(o.cx for o in scene.objects)
        clear = all(b - a >= synthetic.CAPTION_SEPARATION * scene.width for a, b in zip(xs, xs[1:]))
        assert ("caption" in groups) == clear
        asked += clear
    assert 0 < asked < 300


def test_the_free_recipe_maps_tokens_to_two_by_two_patches():
    recipe = td.RECIPES["free"]
    assert (recipe.side, recipe.grid) == (10, 5)
    assert recipe.token_patches[6].tolist() == [22, 23, 32, 33]  # token (1, 1): patches rows 2-3, columns 2-3
    obj = synthetic.Obj("circle", "red", cx=70.0, cy=20.0, radius=9.0, angle=0.0, rgb=(255, 0, 0))
    scene = synthetic.Scene(120, 120, (255, 255, 255), (obj,))
    assert td.centre_token(recipe, scene, obj) == 2  # x 70 of 120: column 2 of 5; y 20: row 0
    targets = td.probe_targets(recipe, scene)
    assert targets["centre"].tolist() == [0, 0, 1] + [0] * 22
    assert targets["shape"][2] == 1 + synthetic.SHAPES.index("circle")
    assert (targets["x"][2], targets["y"][2]) == (2, 0)
    # Each stage switches its variation on at its share of the vision steps, for good.
    assert recipe.nuisances(0) == EASY
    assert recipe.nuisances(recipe.vision_steps - 1) == synthetic.Nuisances()


def test_the_shape_weight_scales_only_the_shape_heads_loss():
    torch.manual_seed(0)
    features = torch.randn(2, 25, 16)
    targets = {k: torch.randint(0, 2, (2, 25)) for k in td.VisionProbe.KEYS}
    plain, weighted = td.VisionProbe(16, 5, 1.0), td.VisionProbe(16, 5, 5.0)
    weighted.load_state_dict(plain.state_dict())
    head = plain.heads["shape"](features).flatten(0, 1)
    shape_loss = torch.nn.functional.cross_entropy(head, targets["shape"].flatten())
    difference = weighted(features, targets) - plain(features, targets)
    assert torch.allclose(difference, 4 * shape_loss / len(td.VisionProbe.KEYS))


def test_the_data_worker_hands_over_what_was_made_in_order():
    made = list(td.prefetched(lambda step: ({"x": torch.tensor([step])}, {"y": torch.tensor([2 * step])}), 9))
    assert [(int(a["x"]), int(b["y"])) for a, b in made] == [(s, 2 * s) for s in range(9)]
