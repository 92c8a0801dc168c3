"""The default model's training targets: answer labels and the attention guides (Grounding),
built with the committed model's own processor on a hand-made scene."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from transformers import AutoProcessor

from vlmexport.training import synthetic
from vlmexport.training import train_default as td

RED_CIRCLE = synthetic.Obj("circle", "red", cx=12.0, cy=12.0, radius=8.0, angle=0.0, rgb=(220, 30, 30))  # cell (0, 0)
BLUE_SQUARE = synthetic.Obj("square", "blue", cx=84.0, cy=60.0, radius=8.0, angle=0.0, rgb=(30, 70, 225))  # cell (3, 2)
RED_STAR = synthetic.Obj("star", "red", cx=36.0, cy=84.0, radius=8.0, angle=0.0, rgb=(220, 30, 30))  # cell (1, 3)
SCENE = synthetic.Scene(96, 96, (235, 235, 235), (RED_CIRCLE, BLUE_SQUARE, RED_STAR))
QAS = [
    synthetic.QA("color", "What color is the circle?", "red"),
    synthetic.QA("position", "Is the red star above or below the blue square?", "below"),
    synthetic.QA("caption", "Describe the image.", "a red circle, a red star and a blue square"),
]


@pytest.fixture(scope="module")
def encoded():
    processor = AutoProcessor.from_pretrained(REPO / "models" / "shapes-vlm" / "checkpoint")
    batches = td.Batches(td.RECIPES["free"], processor, seed=0, batch_size=1)
    text = processor.apply_chat_template(td.conversation(QAS), tokenize=False)
    ids = processor(text=[text], images=[[synthetic.render(SCENE)]], return_tensors="pt")["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0])
    return batches, ids, tokens


def positions(tokens, token):
    return [i for i, t in enumerate(tokens) if t == token]


def test_labels_cover_the_answers_and_their_end_of_utterance(encoded):
    batches, ids, tokens = encoded
    labels = td.answer_labels(ids, batches.marker, batches.eou)[0]
    answered = [tokens[i] for i in range(len(tokens)) if labels[i] != -100]
    assert "".join(answered).replace("Ġ", " ").split("<end_of_utterance>") == [
        " red",
        " below",
        " a red circle, a red star and a blue square",
        "",
    ]


def test_words_attend_to_the_objects_they_name_and_answers_to_the_words(encoded):
    batches, ids, tokens = encoded
    targets = batches.grounding.targets(ids, [SCENE])
    ground, answer = targets["ground"][0, 0], targets["answer"][0]
    images = positions(tokens, "<image>")
    # The 96x96 scene squashed into the 120x120 tile: 10x10 patches, 2x2 of them per image
    # token, tokens in raster order of a 5x5 grid; each object's centre patch names its token.
    cell = {
        obj: images[row * 5 + col]
        for obj, (row, col) in {RED_CIRCLE: (0, 0), BLUE_SQUARE: (3, 4), RED_STAR: (4, 1)}.items()
    }
    assert [td.centre_token(td.RECIPES["free"], SCENE, o) for o in (RED_CIRCLE, BLUE_SQUARE, RED_STAR)] == [0, 19, 21]

    looked_at = {i: set(ground[i].nonzero().flatten().tolist()) for i in range(len(tokens)) if ground[i].any()}
    circle, star, square = positions(tokens, "Ġcircle"), positions(tokens, "Ġstar"), positions(tokens, "Ġsquare")
    red = positions(tokens, "Ġred")
    # question "the circle", answer "red" (both red objects), caption "a red circle";
    # "red star" and "blue square" in the question and the caption
    assert looked_at == {
        circle[0]: {cell[RED_CIRCLE]},
        red[0]: {cell[RED_CIRCLE], cell[RED_STAR]},
        star[0]: {cell[RED_STAR]},
        square[0]: {cell[BLUE_SQUARE]},
        circle[1]: {cell[RED_CIRCLE]},
        star[1]: {cell[RED_STAR]},
        square[1]: {cell[BLUE_SQUARE]},
    }
    # A colour word followed by a shape word is one phrase, grounded at its last token.
    assert tokens[red[1] + 1] == "Ġstar" and not ground[red[1:]].any()

    starts = td.answer_starts(ids[0].tolist(), batches.marker)
    asked = [{h: answer[h, q - 1].nonzero().flatten().tolist() for h in range(td.ANSWER_HEADS)} for q in starts]
    assert asked == [
        {0: [circle[0]], 1: []},
        {0: [star[0]], 1: [square[0]]},
        {0: [], 1: []},  # "Describe the image." names nothing
    ]


def test_the_guide_loss_is_the_attention_mass_on_the_targets():
    attention = torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]])  # (batch, heads, query, key)
    target = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]])  # only query 0 is guided
    assert td.guide_loss(attention, target).item() == pytest.approx(-torch.log(torch.tensor(0.5 + 1e-6)).item())
