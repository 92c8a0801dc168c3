"""The committed freely drawn evaluation set and the default model's card come from
vlmexport.evalsets.drawn as it stands: rerunning it rewrites them byte for byte."""

from __future__ import annotations

import json

from conftest import REPO

from vlmexport.evalsets import drawn

MODEL = REPO / "models" / "shapes-vlm"


def same_files(made, committed):
    names = sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    for name in names:
        assert (made / name).read_bytes() == (committed / name).read_bytes(), name


def test_the_evaluation_set_is_what_the_generator_draws(tmp_path):
    drawn.write(tmp_path, 120, 5)
    same_files(tmp_path, MODEL / "eval-drawn")
    items = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    kinds = {item["kind"] for item in items}
    assert kinds == {"color", "shape", "count", "position", "yesno", "caption"}
    assert any(item["image"].endswith(".jpg") for item in items)
    assert any(item["image"].endswith(".png") for item in items)


def test_the_card_and_its_examples_are_what_the_generator_draws(tmp_path):
    drawn.write_examples(tmp_path)
    package = MODEL / "package"
    assert (tmp_path / "card.json").read_bytes() == (package / "card.json").read_bytes()
    same_files(tmp_path / "examples", package / "examples")
