"""FP32 graphs vs PyTorch on the reference inputs, and FP32 greedy vs reference.json."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, IMAGE_CASES, case_inputs, images_of

from vlmexport.families import idefics3

ATOL = 1e-4  # the export contract: fp32 graphs match PyTorch within 1e-4 max abs


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_vision_encoder_matches_pytorch(name, torch_model, fp32_package):
    _, pv, pam = case_inputs(name)
    expected = idefics3.torch_image_features(torch_model, images_of(pv, pam))
    got = fp32_package.image_features(idefics3.vision_feeds(images_of(pv, pam)))
    assert got.shape == (pv.shape[1], 16, 64)
    assert np.abs(got.reshape(expected.shape) - expected).max() <= ATOL


def test_vision_encoder_partial_mask_matches_pytorch(torch_model, fp32_package):
    """Padded pixels (mask False) change the patch mask and position ids as in transformers."""
    _, pv, pam = case_inputs("one_image")
    pv, pam = pv[:, :3].copy(), pam[:, :3].copy()
    pam[0, 1, 40:, :] = False  # bottom rows padded
    pam[0, 2, :, 20:] = False  # right columns padded
    pv[~np.broadcast_to(pam[:, :, None], pv.shape)] = 0.0
    expected = idefics3.torch_image_features(torch_model, images_of(pv, pam))
    got = fp32_package.image_features(images_of(pv[0], pam[0]))
    assert np.abs(got.reshape(expected.shape) - expected).max() <= ATOL
    full = fp32_package.image_features(images_of(pv[0], np.ones_like(pam[0])))
    assert np.abs(full - got).max() > 1e-2  # the mask really matters


def test_embed_tokens_matches_pytorch(torch_model, fp32_package):
    ids = np.array([CASES["one_image"]["input_ids"]], np.int64)
    expected = torch_model.get_input_embeddings().weight.detach().numpy()[ids]
    got = fp32_package.embed(ids)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_logits_match_pytorch(name, torch_model, fp32_package):
    """Prefill (past length 0) and every cached step along the reference tokens: the row that
    chose each token."""
    ids, pv, pam = case_inputs(name)
    tokens = CASES[name]["generated_ids"]
    expected = idefics3.torch_path_logits(torch_model, ids, images_of(pv, pam), tokens)
    result = fp32_package.greedy(ids, images_of(pv, pam), forced_tokens=tokens)
    got = np.stack(result.logits)
    assert got.shape == expected.shape == (len(tokens), 642)
    assert np.abs(got - expected).max() <= ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_greedy_equals_reference(name, fp32_package):
    ids, pv, pam = case_inputs(name)
    case = CASES[name]
    result = fp32_package.greedy(ids, images_of(pv, pam), max_new_tokens=24)
    assert result.tokens == case["generated_ids"]
    assert len(result.tokens) == 24


def test_decoder_batch_with_left_padding(torch_model, fp32_package):
    """Dynamic batch: two prompts, the shorter left-padded, vs PyTorch."""
    import torch

    a = CASES["text_only"]["input_ids"]
    b = a[5:]
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b], np.int64)
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)], np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, _ = fp32_package.decode(fp32_package.embed(ids), mask, positions, fp32_package.empty_past(2))
    with torch.no_grad():
        expected = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    # The decoder returns the last position's logits, a real token in both rows (left padding).
    assert logits.shape == (2, 1, 642)
    assert np.abs(logits[:, -1] - expected[:, -1]).max() <= ATOL


@pytest.mark.parametrize("splits", [(1,), (5,), (9,), (9, 2)])
def test_decoder_older_block_equals_one_block(fp32_package, splits):
    """The cache split into an older block (layer i's first splits[i % len] columns, left
    padding included; layers may split at different columns) and a recent one gives the
    logits of the whole cache in the recent block, and present holds only the recent block
    and the new positions."""
    a = CASES["text_only"]["input_ids"][:12]
    b = a[3:]
    ids = np.array([a, [0] * 3 + b], np.int64)
    mask = np.array([[1] * 12, [0] * 3 + [1] * 9], np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    embeds = fp32_package.embed(ids)
    _, cache = fp32_package.decode(embeds[:, :9], mask[:, :9], positions[:, :9], fp32_package.empty_past(2))
    session = fp32_package.sessions["decoder_model_merged"]
    names = ["logits", *fp32_package.present_names]

    def step(older, past):
        feeds = {"inputs_embeds": embeds[:, 9:], "attention_mask": mask, "position_ids": positions[:, 9:]}
        feeds.update(zip(fp32_package.older_names, older))
        feeds.update(zip(fp32_package.past_names, past))
        return session.run(names, feeds)

    split = [splits[(t // 2) % len(splits)] for t in range(len(cache))]
    older = [c[:, :, :at] for c, at in zip(cache, split)]
    recent = [c[:, :, at:] for c, at in zip(cache, split)]
    one = step(fp32_package.empty_past(2), cache)
    two = step(older, recent)
    assert np.abs(two[0] - one[0]).max() <= 1e-5
    for whole, present, at in zip(one[1:], two[1:], split):
        assert present.shape[2] == 9 - at + 3
        assert np.abs(whole[:, :, at:] - present).max() <= 1e-5
    # The older block is read: zeroing it changes the logits of the row that attends to it.
    zeroed = step([np.zeros_like(c) for c in older], recent)
    assert np.abs(zeroed[0][0] - one[0][0]).max() > 1e-3
