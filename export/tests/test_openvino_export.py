"""bench/openvino_export.py hands OpenVINO's exporter (transformers 4.57) a checkpoint saved by
transformers 5: the rotary settings must arrive under the keys 4.57 reads, or it exports the
default theta (10000) and, for Qwen2-VL, fails on the missing M-RoPE sections."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from openvino_export import for_transformers_4  # noqa: E402


def converted(tmp_path, fixture: str) -> dict:
    for_transformers_4(REPO / "tests" / "fixtures" / fixture / "checkpoint", tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_qwen2_vl_text_rotary_becomes_theta_and_mrope_sections(tmp_path):
    config = converted(tmp_path, "qwen2-vl-tiny")
    text = config["text_config"]
    assert "rope_parameters" not in text
    assert text["rope_theta"] == 10000.0
    assert text["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    # The vision tower's axial rotary has no transformers 4 key: left as it is.
    assert config["vision_config"]["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "axial"}
    tokenizer = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "GPT2TokenizerFast" and "extra_special_tokens" not in tokenizer


def test_a_llama_text_model_keeps_its_theta_and_no_scaling(tmp_path):
    text = converted(tmp_path, "idefics3-tiny")["text_config"]
    assert "rope_parameters" not in text and "rope_scaling" not in text
    assert text["rope_theta"] == 10000.0
