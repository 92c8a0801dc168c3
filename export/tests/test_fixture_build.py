"""The committed fixture is what make_fixtures.py builds (deterministic rebuild),
and reference.json is consistent with transformers' processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CASES, FIXTURE, IMAGE_CASES, REFERENCE, case_inputs
from PIL import Image

from vlmexport.fixtures import tiny_idefics3 as tiny


def test_rebuilt_tokenizer_matches_checkpoint():
    rebuilt = json.loads(tiny.build_tokenizer().backend_tokenizer.to_str())
    committed = json.loads((FIXTURE / "checkpoint" / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == committed["model"]["vocab"]
    assert rebuilt["model"]["merges"] == committed["model"]["merges"]


def test_rebuilt_weights_match_checkpoint():
    from safetensors.numpy import load_file

    processor = tiny.build_processor()
    model = tiny.build_model(processor.tokenizer, seed=REFERENCE["seed"], std=REFERENCE["init_std"])
    committed = load_file(FIXTURE / "checkpoint" / "model.safetensors")
    rebuilt = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(committed) <= set(rebuilt)
    for name, value in committed.items():
        assert np.array_equal(value, rebuilt[name]), name


def test_chat_template_is_smolvlm():
    template = (FIXTURE / "checkpoint" / "chat_template.jinja").read_text()
    assert template == tiny.CHAT_TEMPLATE


@pytest.mark.parametrize("name", list(CASES))
def test_processor_reproduces_reference_inputs(name):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(FIXTURE / "checkpoint")
    assert type(processor.image_processor).__name__ == REFERENCE["image_processor"]
    case = CASES[name]
    prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    assert prompt == case["prompt"]
    images = [Image.open(FIXTURE / p) for p in case["images"]]
    inputs = processor(text=prompt, images=images or None, return_tensors="np")
    ids, pv, pam = case_inputs(name)
    assert inputs["input_ids"].tolist() == ids.tolist()
    assert processor.tokenizer(case["expanded_prompt"], add_special_tokens=False)["input_ids"] == case["input_ids"]
    if name in IMAGE_CASES:
        assert np.array_equal(inputs["pixel_values"], pv)
        assert np.array_equal(inputs["pixel_attention_mask"].astype(bool), pam)


@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_generate_reproduces_reference_tokens(name, torch_model):
    """Rerunning transformers' greedy generate on the committed checkpoint gives the committed
    reference ids: the references are reproducible, not a one-off."""
    import torch

    ids, pv, pam = case_inputs(name)
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids))}
    if pv is not None:
        inputs["pixel_values"] = torch.from_numpy(pv)
        inputs["pixel_attention_mask"] = torch.from_numpy(pam)
    with torch.no_grad():
        out = torch_model.generate(**inputs, do_sample=False, max_new_tokens=REFERENCE["max_new_tokens"])
    assert out[0, ids.shape[1] :].tolist() == CASES[name]["generated_ids"]
