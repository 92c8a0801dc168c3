#!/usr/bin/env python
"""Train vlmserve's default model on synthetic shape scenes and export it (CPU, seeded).

    .venv/bin/python -m vlmexport.training.train_default --out /tmp/free/shapes-vlm   # the committed model
    .venv/bin/python -m vlmexport.training.train_default --recipe grid --out /tmp/grid/shapes-vlm   # its predecessor
    .venv/bin/python -m vlmexport.training.train_default --init /tmp/free/shapes-vlm/checkpoint \
        --vision-steps 0 --steps 1500 --grid-share 0.5 --lr 5e-4 --out /tmp/more   # train a saved model on

1. Builds a byte-level BPE tokenizer on the task's text (questions, answers, captions, chat
   words) plus the idefics3 special tokens, and the real Idefics3Processor with SmolVLM's chat
   template (tiny_idefics3.py). Images are squashed to one square tile (no splitting) and cut
   into patches as the recipe (RECIPES, --recipe) says: `free`, the committed model, one
   120x120 tile of 10x10 patches of 12 pixels, 2x2 patches per token (pixel shuffle, 25
   tokens); `grid`, its predecessor, one 96x96 tile of 4x4 patches of 24 pixels, one per cell
   of the grid scenes, each patch one image token (16).
2. Trains an Idefics3ForConditionalGeneration of small size on scenes drawn on the fly from
   synthetic.py's training seed: grid scenes (`grid`), or free scenes (shapes anywhere, any
   size, canvas, background and shade, turned, PNG or JPEG) with a fifth grid scenes in the
   first stage and half in the second (`free`). Two stages. First the vision encoder and connector alone (warm_up_vision): a
   training-only probe (VisionProbe) asks every image token for the colour, shape and place
   of the object that covers most of it; without the text model these steps cost less, and
   in `free` the free scenes' variations come one after another (Recipe.nuisance_stages).
   Then the whole model on every variation: each example is one image and a conversation of
   one question of every kind the scene allows, in random order but the caption last (it
   would give away the later answers); the loss is on the answer tokens (and their end of
   utterance) only. The first turn of each conversation is exactly a single-question prompt
   (attention is causal), so later turns are extra practice at no cost in images, and
   equal-length conversations waste little padding. Curriculum: scenes have one object for
   the first 5% of the steps, then up to two until 10% (CURRICULUM), then one to four. The
   probe keeps training, and two attention guides (Grounding) teach the text model the
   lookup the answers need: a colour or shape word attends to the image tokens of the objects
   it names, and the position that predicts an answer attends to the question's words. From
   the answers alone the model took thousands of steps to stop guessing between objects. A
   forked worker draws and processes the batches while the main process trains (prefetched).
3. Saves the checkpoint (weights in fp16) and processor in OUT/checkpoint (save_pretrained), exports it with
   `python -m vlmexport.export` (fp32, fp16, int8) into OUT/package, and writes the held-out evaluation set
   (synthetic.py's evaluation seed) into OUT/eval.

CI never runs this: the result is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmexport import run_export
from vlmexport.fixtures import tiny_idefics3 as tiny
from vlmexport.training import synthetic

VOCAB_SIZE = 400
TEXT_SIZES = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=320,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
# Position questions and captions need the most practice: they bind shapes, colours and places.
KIND_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.0, "position": 1.5, "yesno": 1.0, "caption": 1.0}
MAX_TURNS = len(synthetic.KINDS)
# (fraction of the steps, most objects per scene until then); the full range afterwards.
CURRICULUM = [(0.05, 1), (0.10, 2)]
PREFETCH = 6  # batches the data worker may be ahead
PROBE_MIN_COVER = 0.03  # of a cell's pixels: less object than this is "background"
# Attention guides (Grounding): which text layers and heads learn the two hops of a lookup.
GROUND_LAYER = 1
ANSWER_LAYER = 2
ANSWER_HEADS = 2  # "the circle" and, in "left of the square", "the square"
EVAL_IMAGES = 150
EVAL_PER_IMAGE = 4


@dataclass(frozen=True)
class Recipe:
    """What a model sees and learns from: its image geometry, its vision encoder's size, its
    scenes and how long each stage trains."""

    tile: int  # the one square tile every picture is squashed into
    patch: int
    scale_factor: int  # pixel shuffle: scale_factor x scale_factor patches per image token
    vision: tuple[int, int, int, int]  # hidden, MLP, layers, heads
    # Of the scenes, grid ones (synthetic.random_scene; the rest free) in the vision stage and
    # in the joint one: the vision stage learns to read free shapes, the joint stage must keep
    # the grid scenes' counts and places too.
    grid_share: tuple[float, float]
    # Of the probe's shape head against its other heads: a shape spread over several patches
    # is learnt only with this weight above 1 (models/shapes-vlm/README.md).
    shape_weight: float
    # (fraction of the vision steps, free scenes' variation drawn from then on)
    nuisance_stages: tuple[tuple[float, str], ...]
    vision_steps: int
    steps: int

    @property
    def side(self) -> int:
        """Patches per side."""
        return self.tile // self.patch

    @property
    def grid(self) -> int:
        """Image tokens per side."""
        return self.side // self.scale_factor

    @cached_property
    def token_patches(self) -> np.ndarray:
        """For each image token, the vision patches the connector's pixel shuffle merged into it."""
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        index = torch.arange(self.side * self.side, dtype=torch.float32).view(1, -1, 1)
        merged = Idefics3Connector.pixel_shuffle(None, index, self.scale_factor)
        return merged[0].long().numpy()  # (tokens, patches per token)

    @cached_property
    def token_of_patch(self) -> dict[int, int]:
        return {int(p): t for t, patches in enumerate(self.token_patches) for p in patches}

    def nuisances(self, step: int) -> synthetic.Nuisances:
        """The free scenes' variations the vision stage draws at `step`."""
        return synthetic.Nuisances(**{name: step >= since * self.vision_steps for since, name in self.nuisance_stages})

    def scene(
        self, rng: random.Random, nuisances: synthetic.Nuisances, max_objects: int, grid_share: float
    ) -> synthetic.Scene:
        # A recipe of grid scenes alone draws no share: its scenes stay those it always drew.
        if grid_share == 1.0 or rng.random() < grid_share:
            return synthetic.random_scene(rng, max_objects)
        return synthetic.free_scene(rng, nuisances, max_objects)


RECIPES = {
    # The previous default model: one object per patch of a 4x4 grid, so shapes lie within one
    # patch (see synthetic.py); it misreads shapes drawn elsewhere.
    "grid": Recipe(96, 24, 1, (96, 256, 3, 3), (1.0, 1.0), 1.0, (), vision_steps=600, steps=6800),
    # The committed model, for pictures people draw (models/shapes-vlm/README.md): 10x10
    # patches of 12 pixels, 2x2 per token, a wider vision encoder, and the free scenes'
    # variations one after another in a longer vision stage (all at once, shapes were never
    # learnt), white square canvases of mid-sized upright shapes until the easy case is learnt
    # (about 1000 steps), and the probe's shape head weighted 5x.
    "free": Recipe(
        120,
        12,
        2,
        (128, 512, 4, 4),
        (0.2, 0.5),
        5.0,
        (
            (0.40, "backgrounds"),
            (0.50, "colour_ranges"),
            (0.60, "sizes"),
            (0.70, "aspect"),
            (0.80, "photo"),
            (0.80, "rotation"),
        ),
        vision_steps=2800,
        steps=7500,
    ),
}


# --- processor and model ----------------------------------------------------------
def tokenizer_texts(seed: int, n_scenes: int = 3000) -> list[str]:
    """Every question and answer about a few thousand scenes, plus the chat template's words."""
    rng = random.Random(seed)
    texts = ["User: Assistant:"] * 50
    for _ in range(n_scenes):
        scene = synthetic.random_scene(rng)
        for group in synthetic.questions_by_kind(scene, rng).values():
            texts += [f"{qa.question} {qa.answer}" for qa in group]
    return texts


def build_processor(recipe: Recipe, seed: int):
    tokenizer = tiny.build_tokenizer(VOCAB_SIZE, tokenizer_texts(seed))
    edge = {"longest_edge": recipe.tile}
    image_processor = tiny.build_image_processor(do_image_splitting=False, size=edge, max_image_size=edge)
    return tiny.build_processor(tokenizer, image_processor, recipe.grid**2)


def build_model(recipe: Recipe, tokenizer, seed: int):
    hidden, mlp, layers, heads = recipe.vision
    vision = dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=recipe.tile,
        patch_size=recipe.patch,
    )
    config = tiny.build_config(tokenizer, TEXT_SIZES, vision, recipe.scale_factor)
    return tiny.build_model(tokenizer, seed=seed, std=None, config=config)


# --- vision probe -------------------------------------------------------------------
class VisionProbe(torch.nn.Module):
    """Training-only heads on the image tokens the text model sees (the connector's output).

    For each token: the colour and the shape of the object covering most of its cell, whether
    that object's centre lies in the cell, and the centre's column and row. Answers alone teach
    the vision encoder slowly (the signal has to pass through the text model's attention first);
    these dense labels make every token say which object it shows and where, so the text model
    only has to look the answer up. Not part of the saved model.
    """

    KEYS = ("colour", "shape", "centre", "x", "y")

    def __init__(self, hidden: int, grid: int, shape_weight: float):
        super().__init__()
        sizes = (len(synthetic.COLOURS) + 1, len(synthetic.SHAPES) + 1, 2, grid, grid)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in zip(self.KEYS, sizes)})
        self.weights = {k: shape_weight if k == "shape" else 1.0 for k in self.KEYS}

    def forward(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = [
            self.weights[k] * F.cross_entropy(head(features).flatten(0, 1), targets[k].flatten(), ignore_index=-100)
            for k, head in self.heads.items()
        ]
        return sum(losses) / len(losses)


def centre_token(recipe: Recipe, scene: synthetic.Scene, obj: synthetic.Obj) -> int:
    """The image token of the cell that holds the object's centre."""
    px = min(recipe.side - 1, int(obj.cx / scene.width * recipe.side))
    py = min(recipe.side - 1, int(obj.cy / scene.height * recipe.side))
    return recipe.token_of_patch[py * recipe.side + px]


def probe_batch(recipe: Recipe, scenes: list[synthetic.Scene]) -> dict[str, torch.Tensor]:
    """probe_targets of each scene, stacked into batch tensors."""
    probes = [probe_targets(recipe, s) for s in scenes]
    return {k: torch.from_numpy(np.stack([p[k] for p in probes])) for k in VisionProbe.KEYS}


def probe_targets(recipe: Recipe, scene: synthetic.Scene) -> dict[str, np.ndarray]:
    side, patch, grid = recipe.side, recipe.patch, recipe.grid
    owners = np.asarray(synthetic.object_map(scene, recipe.tile))
    patches = owners.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, -1)
    cells = patches[recipe.token_patches].reshape(len(recipe.token_patches), -1)  # (tokens, pixels)
    colours, shapes = list(synthetic.COLOURS), synthetic.SHAPES
    out = {k: np.full(len(cells), -100, dtype=np.int64) for k in VisionProbe.KEYS}
    out["colour"][:] = 0
    out["shape"][:] = 0
    out["centre"][:] = 0
    for t, cell in enumerate(cells):
        counts = np.bincount(cell, minlength=len(scene.objects) + 1)
        counts[0] = 0
        if counts.max() >= PROBE_MIN_COVER * cell.size:
            obj = scene.objects[int(counts.argmax()) - 1]
            out["colour"][t] = 1 + colours.index(obj.colour)
            out["shape"][t] = 1 + shapes.index(obj.shape)
            out["x"][t] = min(grid - 1, int(obj.cx / scene.width * grid))
            out["y"][t] = min(grid - 1, int(obj.cy / scene.height * grid))
    for obj in scene.objects:
        out["centre"][centre_token(recipe, scene, obj)] = 1
    return out


# --- batches ------------------------------------------------------------------------
def max_objects(step: int, steps: int) -> int:
    return next((n for until, n in CURRICULUM if step < until * steps), synthetic.MAX_OBJECTS)


def turn_order(qas: list[synthetic.QA]) -> list[synthetic.QA]:
    """The caption, if any, comes last: it would give the other answers away."""
    return sorted(qas, key=lambda qa: qa.kind == "caption")  # stable: the others keep their order


def conversation(qas: list[synthetic.QA]) -> list[dict]:
    """The image comes with the first question, as in a single-question request."""
    messages = []
    for i, qa in enumerate(qas):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": qa.question}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": qa.answer}]})
    return messages


def answer_starts(ids: list[int], marker: list[int]) -> list[int]:
    """Positions of each turn's first answer token (right after "Assistant:")."""
    m = len(marker)
    return [i for i in range(m, len(ids)) if ids[i - m : i] == marker]


def answer_labels(input_ids: torch.Tensor, marker: list[int], eou: int) -> torch.Tensor:
    """input_ids where the model must produce them (after "Assistant:" up to and including
    <end_of_utterance>), -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        for i in answer_starts(ids, marker):
            end = ids.index(eou, i) if eou in ids[i:] else len(ids) - 1
            labels[row, i : end + 1] = input_ids[row, i : end + 1]
    return labels


class Grounding:
    """Training-only attention targets that teach the text model to look things up in the image.

    Every colour or shape word in the text (a "phrase": "red", "circle", "red circle", "red
    object", "shapes") names a set of objects; at the phrase's last token, head 0 of text layer
    GROUND_LAYER is taught to attend to those objects' image tokens (one hop: the word is right
    there). At the position that predicts an answer, heads 0 and 1 of ANSWER_LAYER are taught
    to attend to the last tokens of the question's first and second phrases (one more hop: they
    now hold what was seen). Learning the two hops together from the answers alone is what kept
    the model guessing between objects.
    """

    GENERIC = {"object", "objects", "shapes"}

    def __init__(self, recipe: Recipe, tokenizer, marker: list[int], eou: int, image_token: int):
        self.recipe, self.marker, self.eou, self.image_token = recipe, marker, eou, image_token
        self.words = {}
        for token, i in tokenizer.get_vocab().items():
            word = tokenizer.convert_tokens_to_string([token]).strip().lower()
            if word in synthetic.COLOURS:
                self.words[i] = ("colour", word)
            elif word in synthetic.SHAPES or word.removesuffix("s") in synthetic.SHAPES:
                self.words[i] = ("shape", word.removesuffix("s"))
            elif word in self.GENERIC:
                self.words[i] = ("generic", None)

    def phrases(self, ids: list[int], scene: synthetic.Scene) -> list[tuple[int, tuple[int, ...]]]:
        """(position of the phrase's last token, the objects it names), in text order."""
        out, colour = [], None
        for i, token in enumerate(ids):
            kind, word = self.words.get(token, (None, None))
            following = self.words.get(ids[i + 1], ("",))[0] if i + 1 < len(ids) else ""
            if kind == "colour":
                if following not in ("shape", "generic"):
                    out.append((i, synthetic.matching(scene, colour=word)))
                colour = word
                continue
            named = {"colour": colour} if colour else {}
            if kind == "shape":
                out.append((i, synthetic.matching(scene, shape=word, **named)))
            elif kind == "generic":
                out.append((i, synthetic.matching(scene, **named)))
            colour = None
        return out

    def targets(self, input_ids: torch.Tensor, scenes: list[synthetic.Scene]) -> dict[str, torch.Tensor]:
        b, n = input_ids.shape
        ground = torch.zeros(b, 1, n, n)
        answer = torch.zeros(b, ANSWER_HEADS, n, n)
        for row, ids in enumerate(input_ids.tolist()):
            scene = scenes[row]
            images = [i for i, t in enumerate(ids) if t == self.image_token]
            phrases = [(i, objects) for i, objects in self.phrases(ids, scene) if i > images[-1]]
            for i, objects in phrases:
                for o in objects:
                    ground[row, 0, i, images[centre_token(self.recipe, scene, scene.objects[o])]] = 1.0
            turn_start = images[-1]
            for start in answer_starts(ids, self.marker):
                asked = [i for i, _ in phrases if turn_start < i < start]
                for head, i in enumerate(asked[:ANSWER_HEADS]):
                    answer[row, head, start - 1, i] = 1.0
                turn_start = ids.index(self.eou, start) if self.eou in ids[start:] else n
        return {"ground": ground, "answer": answer}


class Batches:
    """Fresh scenes every step from one seeded generator, as the recipe draws them: the
    training data never repeats."""

    def __init__(self, recipe: Recipe, processor, seed: int, batch_size: int):
        self.recipe = recipe
        self.processor = processor
        self.rng = random.Random(seed)
        self.batch_size = batch_size
        tokenizer = processor.tokenizer
        self.marker = tokenizer("<end_of_utterance>\nAssistant:", add_special_tokens=False)["input_ids"]
        self.eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        self.grounding = Grounding(recipe, tokenizer, self.marker, self.eou, tokenizer.convert_tokens_to_ids("<image>"))

    def batch(self, max_objects: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The model's inputs with labels, and the vision probe's and attention guide's targets."""
        texts, images, scenes = [], [], []
        for _ in range(self.batch_size):
            scene = self.recipe.scene(self.rng, synthetic.Nuisances(), max_objects, self.recipe.grid_share[1])
            qas = turn_order(synthetic.sample_questions(scene, self.rng, MAX_TURNS, KIND_WEIGHTS))
            texts.append(self.processor.apply_chat_template(conversation(qas), tokenize=False))
            images.append([synthetic.render(scene)])
            scenes.append(scene)
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch["labels"] = answer_labels(batch["input_ids"], self.marker, self.eou)
        targets = probe_batch(self.recipe, scenes) | self.grounding.targets(batch["input_ids"], scenes)
        return dict(batch), targets

    def images(self, n: int, nuisances: synthetic.Nuisances) -> tuple[dict, dict[str, torch.Tensor]]:
        """n scenes as the vision encoder's inputs, with the probe's targets (no text)."""
        share = self.recipe.grid_share[0]
        scenes = [self.recipe.scene(self.rng, nuisances, synthetic.MAX_OBJECTS, share) for _ in range(n)]
        pixels = self.processor.image_processor([[synthetic.render(s)] for s in scenes], return_tensors="pt")
        return dict(pixels), probe_batch(self.recipe, scenes)


def guide_loss(attentions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass the guided heads (the first ones) put on their targets,
    at the query positions that have any."""
    mass = (attentions[:, : target.shape[1]] * target).sum(-1)  # (batch, heads, seq)
    where = target.sum(-1) > 0
    if not where.any():
        return attentions.new_zeros(())
    return -torch.log(mass[where] + 1e-6).mean()


def prefetched(make, steps: int):
    """make(step) for each step, made by a forked worker process up to PREFETCH steps ahead:
    drawing and processing the scenes takes the second core while training takes the first."""
    context = torch.multiprocessing.get_context("fork")
    queue = context.Queue(PREFETCH)

    # As numpy arrays, pickled whole: shared tensors would die with a worker that finished.
    def work() -> None:
        torch.set_num_threads(1)
        for step in range(steps):
            queue.put([{k: v.numpy() for k, v in part.items()} for part in make(step)])

    worker = context.Process(target=work, daemon=True)
    worker.start()
    try:
        for _ in range(steps):
            yield tuple({k: torch.from_numpy(v) for k, v in part.items()} for part in queue.get())
    finally:
        worker.join(timeout=1)
        if worker.is_alive():
            worker.kill()


# --- training -----------------------------------------------------------------------
def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise(name: str, optimizer, steps: int, args, losses_of) -> list[dict]:
    """`steps` AdamW steps on sum(weight * loss) of the (loss, weight) pairs that
    losses_of(step) names, under the warm-up and cosine schedule, with gradients clipped to 1;
    a history entry (running means of each loss) every 50 steps."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start, running, history = time.time(), {}, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup)
        losses = losses_of(step)
        sum(weight * loss for loss, weight in losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for k, (loss, _) in losses.items():
            running[k] = loss.item() if k not in running else 0.95 * running[k] + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.time() - start
            history.append(
                {"step": step + 1} | {k: round(v, 4) for k, v in running.items()} | {"elapsed_s": round(elapsed, 1)}
            )
            shown = " ".join(f"{k} {v:.4f}" for k, v in running.items())
            print(f"{name} step {step + 1}/{steps} {shown} {elapsed / 60:.1f} min", flush=True)
    return history


def warm_up_vision(model, probe: VisionProbe, features: dict, batches: Batches, args) -> list[dict]:
    """Train the vision encoder and connector on the probe alone first: without the text model
    a step costs a tenth, and the text model then starts from image tokens that already say
    what is in their cell (jointly, shapes took ~900 steps to appear, and the attention guide's
    gradients through unformed features slowed that further)."""
    params = (
        list(model.model.vision_model.parameters())
        + list(model.model.connector.parameters())
        + list(probe.parameters())
    )
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    feed = prefetched(
        lambda step: batches.images(args.vision_batch_size, batches.recipe.nuisances(step)), batches.recipe.vision_steps
    )

    def losses(_step: int) -> dict:
        pixels, targets = next(feed)
        model.model.get_image_features(**pixels)  # the connector's hook records the image tokens
        return {"probe": (probe(features["image"], targets), 1.0)}

    history = optimise("vision", optimizer, batches.recipe.vision_steps, args, losses)
    return history, shape_accuracy(model, probe, features, batches)


@torch.no_grad()
def shape_accuracy(model, probe: VisionProbe, features: dict, batches: Batches, n: int = 200) -> float:
    """How often the probe names the shape at each object's centre token, on n fresh free
    scenes with every variation: whether the vision stage learnt to read shapes."""
    rng = random.Random(synthetic.EVAL_SEED)
    scenes = [synthetic.free_scene(rng) for _ in range(n)]
    pixels = batches.processor.image_processor([[synthetic.render(s)] for s in scenes], return_tensors="pt")
    model.model.get_image_features(**pixels)
    predicted = probe.heads["shape"](features["image"]).argmax(-1)
    hits = [
        int(predicted[i, centre_token(batches.recipe, scene, obj)]) == 1 + synthetic.SHAPES.index(obj.shape)
        for i, scene in enumerate(scenes)
        for obj in scene.objects
    ]
    return round(sum(hits) / len(hits), 4)


def train(model, batches: Batches, args) -> dict:
    recipe = batches.recipe
    probe = VisionProbe(model.config.text_config.hidden_size, recipe.grid, recipe.shape_weight)
    features = {}
    model.model.connector.register_forward_hook(lambda _module, _inputs, output: features.update(image=output))
    vision_history, vision_shapes = warm_up_vision(model, probe, features, batches, args)
    print(f"vision stage: shapes read at object centres on free scenes {vision_shapes:.1%}", flush=True)
    params = list(model.parameters()) + list(probe.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )

    feed = prefetched(lambda step: batches.batch(max_objects(step, recipe.steps)), recipe.steps)

    def losses(_step: int) -> dict:
        inputs, targets = next(feed)
        out = model(**inputs, output_attentions=args.guide_weight > 0)
        out_losses = {"loss": (out.loss, 1.0), "probe": (probe(features["image"], targets), args.probe_weight)}
        if args.guide_weight > 0:
            ground = guide_loss(out.attentions[GROUND_LAYER], targets["ground"])
            answer = guide_loss(out.attentions[ANSWER_LAYER], targets["answer"])
            out_losses |= {
                "ground": (ground, args.guide_weight),
                "answer": (answer, args.guide_weight * args.answer_guide),
            }
        return out_losses

    model.set_attn_implementation("eager")  # the guides need the attention weights
    model.train()
    history = optimise("joint", optimizer, recipe.steps, args, losses)
    model.set_attn_implementation("sdpa")
    model.eval()
    return {
        "vision_steps": recipe.vision_steps,
        "steps": recipe.steps,
        "train_s": round(sum(h[-1]["elapsed_s"] for h in (vision_history, history) if h), 1),
        "final_loss": history[-1]["loss"],
        "vision_shape_accuracy": vision_shapes,
        "vision_history": vision_history,
        "history": history,
    }


@torch.no_grad()
def quick_accuracy(model, processor, seed: int, n: int, make_scene) -> dict:
    """Greedy exact match in PyTorch on n fresh single questions about make_scene(rng) (a
    sanity check only; the reported figures come from `vlmserve eval` through the Rust runtime)."""
    rng = random.Random(seed)
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    correct: dict[str, list[int]] = {}
    for _ in range(n):
        scene = make_scene(rng)
        (qa,) = synthetic.sample_questions(scene, rng, 1, {})
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=[synthetic.render(scene)], return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=32, eos_token_id=eou)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct.setdefault(qa.kind, []).append(int(answer.strip() == qa.answer))
    per_kind = {k: round(sum(v) / len(v), 4) for k, v in sorted(correct.items())}
    total = [x for v in correct.values() for x in v]
    return {"items": n, "exact_match": round(sum(total) / len(total), 4), "per_kind": per_kind}


# --- output -------------------------------------------------------------------------
def export(checkpoint: Path, package: Path) -> None:
    # Trained logits reach tens, and fp32 ONNX-vs-PyTorch differences grow with them (4e-4 seen):
    # 1e-3 still catches any real export error.
    run_export("--model", str(checkpoint), "--out", str(package), "--precisions", "fp32,fp16,int8", "--atol", "1e-3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes checkpoint/, package/, eval/, training.json")
    parser.add_argument("--recipe", choices=RECIPES, default="free", help="what the model sees and learns from")
    parser.add_argument(
        "--init", type=Path, help="go on training this checkpoint (its weights and processor) instead of new ones"
    )
    parser.add_argument(
        "--grid-share", type=float, help="of the joint stage's scenes: grid ones (default: the recipe's)"
    )
    parser.add_argument("--steps", type=int, help="joint steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--probe-weight", type=float, default=1.0, help="weight of the vision probe's loss")
    parser.add_argument(
        "--vision-steps", type=int, help="probe-only steps before the joint ones (default: the recipe's)"
    )
    parser.add_argument("--vision-batch-size", type=int, default=32)
    parser.add_argument(
        "--guide-weight", type=float, default=1.0, help="weight of the attention guides' losses (0: off)"
    )
    parser.add_argument("--answer-guide", type=float, default=1.0, help="relative weight of the answer hop's guide")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch order")
    parser.add_argument("--threads", type=int, default=1, help="a second thread barely speeds up matrices this small")
    parser.add_argument("--skip-export", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    recipe = RECIPES[args.recipe]
    chosen = {"steps": args.steps, "vision_steps": args.vision_steps}
    recipe = replace(recipe, **{k: v for k, v in chosen.items() if v is not None})
    if args.grid_share is not None:
        recipe = replace(recipe, grid_share=(recipe.grid_share[0], args.grid_share))
    if args.init:
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration

        processor = AutoProcessor.from_pretrained(args.init)
        model = Idefics3ForConditionalGeneration.from_pretrained(args.init)
    else:
        processor = build_processor(recipe, synthetic.TRAIN_SEED)
        model = build_model(recipe, processor.tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocabulary {len(processor.tokenizer)}", flush=True)
    batches = Batches(recipe, processor, seed=synthetic.TRAIN_SEED * 1000 + args.seed, batch_size=args.batch_size)
    summary = {"parameters": n_params, "args": {k: str(v) for k, v in vars(args).items()}}
    summary |= train(model, batches, args)
    seed = synthetic.EVAL_SEED * 1000 + 7
    summary["pytorch_check"] = {
        "grid": quick_accuracy(model, processor, seed, 300, synthetic.random_scene),
        "free": quick_accuracy(model, processor, seed, 300, synthetic.free_scene),
    }
    print(json.dumps(summary["pytorch_check"]), flush=True)

    checkpoint = args.out / "checkpoint"
    # In fp16: half the committed bytes; the export reads the weights back as fp32.
    model.to(torch.float16).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    synthetic.write_eval_set(args.out / "eval", synthetic.EVAL_SEED, EVAL_IMAGES, EVAL_PER_IMAGE)
    if not args.skip_export:
        export(checkpoint, args.out / "package")


if __name__ == "__main__":
    main()
