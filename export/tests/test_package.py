"""Package layout, variants.json and the export report bounds.

Documented bounds for the tiny fixture model (see export/README.md):
  fp32  max |logit - PyTorch| <= 1e-4, greedy 24/24 with PyTorch
  fp16  max |logit - fp32| <= 0.25, teacher-forced argmax agrees on >= 23 of 24 steps
  int8  max |logit - fp32| <= 2.0, teacher-forced argmax agrees on >= 16 of 24 steps
  (both, on the report's reference input: the first free-running greedy token equals fp32's)
The tiny model has random weights: its logits are flat (top-2 gaps of a few
hundredths) and its activations large, so int8 flips argmax far more often than
on a trained model, and one flip derails free-running decoding; hence bounds on
teacher-forced agreement, not on free decoding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CASES, FIXTURE, REFERENCE, case_inputs, images_of

PACKAGE = FIXTURE / REFERENCE["package"]
VARIANTS = json.loads((PACKAGE / "onnx" / "variants.json").read_text())
REPORT = json.loads((PACKAGE / "export_report.json").read_text())
BOUNDS = {"fp16": (0.25, 23), "int8": (2.0, 16)}
STORED = {"int8": "uint8"}


def test_package_files():
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "export_report.json",
        "onnx/variants.json",
    ]:
        assert (PACKAGE / name).is_file(), name
    for suffix in ["", "_fp16", "_int8"]:
        for graph in ["vision_encoder", "embed_tokens", "decoder_model_merged"]:
            assert (PACKAGE / "onnx" / f"{graph}{suffix}.onnx").is_file()
    assert not list(FIXTURE.glob(".package.*")), "staging folder left behind"


def test_generation_config_eos():
    gen = json.loads((PACKAGE / "generation_config.json").read_text())
    tokenizer = json.loads((PACKAGE / "tokenizer.json").read_text())
    eou = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<end_of_utterance>")
    assert gen["eos_token_id"] == eou == REFERENCE["eos_token_id"]
    assert gen["pad_token_id"] == eou


@pytest.mark.parametrize("variant,weight_dtype", [("fp32", "float32"), ("fp16", "float16"), ("int8", "int8")])
def test_variants_manifest(variant, weight_dtype):
    entry = VARIANTS["variants"][variant]
    decoder = entry["graphs"]["decoder_model_merged"]
    assert decoder["weight_dtype"] == weight_dtype
    # The fp16 decoder takes and returns its cache in fp16 (no per-step cast of the cache);
    # every other input and output is fp32 in every variant.
    cache = "float16" if variant == "fp16" else "float32"
    assert decoder["kv_cache_dtype"] == cache
    assert decoder["inputs"]["inputs_embeds"] == "float32"
    assert decoder["inputs"]["attention_mask"] == decoder["inputs"]["position_ids"] == "int64"
    assert decoder["inputs"]["past_key_values.1.value"] == decoder["inputs"]["older_key_values.0.key"] == cache
    assert decoder["outputs"]["present.0.key"] == cache
    assert decoder["outputs"]["logits"] == "float32"
    vision = entry["graphs"]["vision_encoder"]
    assert vision["inputs"] == {"pixel_values": "float32", "pixel_attention_mask": "bool"}
    assert vision["outputs"] == {"image_features": "float32"}
    assert entry["graphs"]["embed_tokens"]["inputs"] == {"input_ids": "int64"}
    # The measured weights agree with the declared dtype: it holds the most bytes of the decoder
    # (whose int8 MatMulNBits blocks store signed values offset by 128 as uint8).
    sizes = decoder["initializer_bytes"]
    assert max(sizes, key=sizes.get) == STORED.get(weight_dtype, weight_dtype)
    # So does the token table's (to_int8_table: int8 values, a float scale per 32 of them).
    table = entry["graphs"]["embed_tokens"]["initializer_bytes"]
    assert max(table, key=table.get) == weight_dtype


def test_report_fp32():
    fp32 = REPORT["variants"]["fp32"]
    assert fp32["max_abs_logit_diff_vs_pytorch"] <= 1e-4
    assert fp32["max_abs_image_features_diff_vs_pytorch"] <= 1e-4
    assert fp32["greedy_tokens_agree"] == fp32["greedy_tokens"] == 24


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_report_variant_within_bounds(variant):
    max_diff, min_agree = BOUNDS[variant]
    figures = REPORT["variants"][variant]
    assert 0 < figures["max_abs_logit_diff_vs_fp32"] <= max_diff
    assert figures["greedy_tokens"] == 24
    assert figures["teacher_forced_argmax_agree"] >= min_agree
    assert figures["greedy_common_prefix"] >= 1


@pytest.mark.parametrize("variant", ["fp16", "int8"])
@pytest.mark.parametrize("name", ["one_image", "long_prompt"])
def test_variant_on_reference_cases(variant, name):
    """Variant graphs vs the fp32 reference tokens of real cases, within the same bounds."""
    from vlmexport.export.onnx_runner import OnnxPackage

    max_diff, min_agree = BOUNDS[variant]
    ids, pv, pam = case_inputs(name)
    tokens = CASES[name]["generated_ids"]
    forced = OnnxPackage(PACKAGE, variant).greedy(ids, images_of(pv, pam), forced_tokens=tokens)
    fp32 = OnnxPackage(PACKAGE, "fp32").greedy(ids, images_of(pv, pam), forced_tokens=tokens)
    assert sum(int(np.argmax(r)) == t for r, t in zip(forced.logits, tokens)) >= min_agree
    diff = max(np.abs(a - b).max() for a, b in zip(forced.logits, fp32.logits))
    assert np.isfinite(diff) and diff <= max_diff
