"""The decoder exported with fused attention (`export --attention fused`): ONNX Runtime's
com.microsoft.GroupQueryAttention over one cache buffer per layer, written in place."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vlmexport import run_export
from vlmexport.export.onnx_runner import OnnxPackage
from vlmexport.export.precision import to_int8_blockwise
from vlmexport.families.shared import causal_mask, group_query_attention

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def test_the_op_reference_writes_the_new_positions_and_attends_like_eager_attention():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, cached, q_len, capacity = 2, 6, 2, 8, 5, 3, 12
    total = cached + q_len
    past_key = torch.randn(batch, kv_heads, capacity, head_dim)
    past_value = torch.randn(batch, kv_heads, capacity, head_dim)
    query = torch.randn(batch, heads, q_len, head_dim)
    key = torch.randn(batch, kv_heads, q_len, head_dim)
    value = torch.randn(batch, kv_heads, q_len, head_dim)
    padding = torch.ones(batch, total, dtype=torch.long)
    padding[1, :2] = 0  # row 1 left-padded
    mask = causal_mask(padding, q_len, torch.float32)

    def packed(x):
        return x.transpose(1, 2).reshape(batch, q_len, -1)

    scale = head_dim**-0.5
    out, present_key, present_value = group_query_attention(
        packed(query), packed(key), packed(value), past_key, past_value, torch.tensor(total), mask, heads, scale
    )
    for past, new, present in ((past_key, key, present_key), (past_value, value, present_value)):
        assert torch.equal(present[:, :, cached:total], new)
        assert torch.equal(present[:, :, :cached], past[:, :, :cached])
        assert torch.equal(present[:, :, total:], past[:, :, total:])
    module = type("Module", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    expected, _ = eager_attention_forward(
        module, query, present_key[:, :, :total], present_value[:, :, :total], mask, scaling=scale
    )
    assert torch.allclose(out.view(batch, q_len, heads, head_dim), expected, atol=1e-6)


def with_decoder(fixture: str, decoder: Path, out: Path) -> Path:
    """A copy of the fixture's package with `decoder` as its FP32 decoder."""
    shutil.copytree(FIXTURES / fixture / "package", out)
    shutil.copy(decoder, out / "onnx" / "decoder_model_merged.onnx")
    return out


@pytest.mark.parametrize("fixture", ["idefics3-tiny", "qwen2-vl-tiny"])
def test_the_committed_fused_decoder_answers_like_the_grouped_one(fixture, tmp_path):
    """A prompt long enough that the runner's buffers grow twice, greedy through both decoders."""
    fused = OnnxPackage(
        with_decoder(fixture, FIXTURES / fixture / "fused" / "decoder_model_merged.onnx", tmp_path / "p")
    )
    grouped = OnnxPackage(FIXTURES / fixture / "package")
    assert fused.in_place and not grouped.in_place
    ids = np.random.default_rng(0).integers(0, 600, (1, 300))
    a, b = fused.greedy(ids, max_new_tokens=24), grouped.greedy(ids, max_new_tokens=24)
    assert a.tokens == b.tokens
    assert max(np.abs(x - y).max() for x, y in zip(a.logits, b.logits)) < 1e-4


def test_export_with_fused_attention_optimized_and_int8(tmp_path):
    out = tmp_path / "package"
    checkpoint = FIXTURES / "idefics3-tiny" / "checkpoint"
    run_export(
        "--model", str(checkpoint), "--out", str(out), "--precisions", "fp32,int8", "--attention", "fused", "--optimize"
    )
    report = json.loads((out / "export_report.json").read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["greedy_tokens_agree"] == fp32["greedy_tokens"] == 24
    layers = json.loads((checkpoint / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for file in ("decoder_model_merged.onnx", "decoder_model_merged_int8.onnx"):
        graph = onnx.load(str(out / "onnx" / file)).graph
        assert Counter(node.op_type for node in graph.node)["GroupQueryAttention"] == layers, file
        cache = [value for value in [*graph.input, *graph.output] if value.name.endswith(".key")]
        axes = {value.name: value.type.tensor_type.shape.dim[2].dim_param for value in cache}
        assert axes["past_key_values.0.key"] == axes["present.0.key"] == "cache_capacity", file
    # INT8 from the fused graph against the same quantizer on the grouped graph.
    grouped = tmp_path / "grouped"
    shutil.copytree(FIXTURES / "idefics3-tiny" / "package", grouped)
    to_int8_blockwise(
        grouped / "onnx" / "decoder_model_merged.onnx", grouped / "onnx" / "decoder_model_merged_int8.onnx"
    )
    ids = np.random.default_rng(0).integers(0, 600, (1, 300))
    fused_tokens = OnnxPackage(out, "int8").greedy(ids, max_new_tokens=24).tokens
    assert fused_tokens == OnnxPackage(grouped, "int8").greedy(ids, max_new_tokens=24).tokens
