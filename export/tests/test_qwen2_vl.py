"""The Qwen2-VL and Qwen2.5-VL fixtures (tests/fixtures/qwen2*-vl-tiny): the committed
references are reproducible with transformers, and the exported graphs match PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO

from vlmexport import fixtures
from vlmexport.families import qwen2_vl

FIXTURES = [REPO / "tests" / "fixtures" / name for name in ("qwen2-vl-tiny", "qwen2.5-vl-tiny")]
ATOL = 1e-4


def cases(fixture):
    return json.loads((fixture / "reference.json").read_text())["cases"]


def array(fixture, case, key):
    entry = case.get(key)
    return None if entry is None else fixtures.load_array(fixture / entry["file"])


def images_of(fixture, case):
    if case["pixel_values"] is None:
        return None
    return {key: array(fixture, case, key) for key in qwen2_vl.IMAGE_KEYS}


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.name)
def fixture(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(fixture):
    import torch

    torch.set_num_threads(2)
    return qwen2_vl.load(str(fixture / "checkpoint"))


@pytest.fixture(scope="module")
def package(fixture):
    from vlmexport.export.onnx_runner import OnnxPackage

    return OnnxPackage(fixture / "package", "fp32")


def test_processor_reproduces_the_references(fixture, loaded):
    from PIL import Image

    _, processor = loaded
    for case in cases(fixture):
        prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        assert prompt == case["prompt"]
        images = [Image.open(fixture / p) for p in case["images"]] or None
        inputs = processor(text=prompt, images=images, return_tensors="np")
        assert inputs["input_ids"][0].tolist() == case["input_ids"], case["name"]
        if images:
            assert np.array_equal(inputs["pixel_values"], array(fixture, case, "pixel_values")), case["name"]
            assert np.array_equal(inputs["image_grid_thw"], array(fixture, case, "image_grid_thw")), case["name"]


def test_vision_encoder_and_positions_match_pytorch(fixture, loaded, package):
    model, _ = loaded
    for case in cases(fixture):
        images = images_of(fixture, case)
        ids = np.array([case["input_ids"]], np.int64)
        positions, next_position = qwen2_vl.prompt_positions(package.config, ids, images)
        assert np.array_equal(positions, qwen2_vl.torch_rope_index(model, ids, images)), case["name"]
        assert next_position == positions.max() + 1
        if images is None:
            continue
        got = package.image_features(qwen2_vl.vision_feeds(images, package.config))
        expected = array(fixture, case, "image_features")
        assert got.shape == expected.shape and np.abs(got - expected).max() <= ATOL, case["name"]


@pytest.mark.parametrize("name", ["two_images", "very_tall"])
def test_pytorch_generate_and_onnx_greedy_reproduce_the_reference(fixture, loaded, package, name):
    model, _ = loaded
    case = next(c for c in cases(fixture) if c["name"] == name)
    ids, images = np.array([case["input_ids"]], np.int64), images_of(fixture, case)
    assert qwen2_vl.torch_greedy(model, ids, images, max_new_tokens=24) == case["generated_ids"]
    assert package.greedy(ids, images, max_new_tokens=24).tokens == case["generated_ids"]


def test_export_report_bounds(fixture):
    report = json.loads((fixture / "package" / "export_report.json").read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["max_abs_logit_diff_vs_pytorch"] <= ATOL and fp32["max_abs_image_features_diff_vs_pytorch"] <= ATOL
    assert fp32["greedy_tokens_agree"] == fp32["greedy_tokens"] == 24
    assert report["variants"]["fp16"]["teacher_forced_argmax_agree"] >= 23
    assert report["variants"]["int8"]["teacher_forced_argmax_agree"] >= 16
