"""`python -m vlmexport.export` on bad input: non-zero exit, one clear stderr line, no package left behind.

Plus: a checkpoint the user saved with save_pretrained exports with no code changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXPORT_DIR, FIXTURE

SUPPORTED = "Supported families: idefics3 (model_type: idefics3, smolvlm); qwen2_vl (model_type: qwen2_vl, qwen2_5_vl)"


def run_export(model, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(EXPORT_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "vlmexport.export", "--model", str(model), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("vlmexport.export: error: ")
    assert SUPPORTED in lines[0]
    for needle in needles:
        assert needle in lines[0]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out") or p.name == "out")


def test_folder_that_is_not_a_model(tmp_path):
    src = tmp_path / "not-a-model"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    proc = run_export(src, tmp_path / "out")
    assert_one_line_error(proc, "not a model folder", "no config.json")
    assert leftovers(tmp_path) == []


def test_unknown_model_type(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_export(src, tmp_path / "out")
    assert_one_line_error(proc, "unsupported model_type 'bert'")
    assert leftovers(tmp_path) == []


def test_missing_hub_model_offline(tmp_path):
    proc = run_export("no-such-user/no-such-model", tmp_path / "out")
    assert_one_line_error(proc, "neither a local folder nor a reachable hub model")
    assert leftovers(tmp_path) == []


def test_unwritable_output_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_export(FIXTURE / "checkpoint", blocker / "out")
    assert_one_line_error(proc, "cannot write to output folder")
    assert blocker.read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_read_only_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_export(FIXTURE / "checkpoint", parent / "out")
        assert_one_line_error(proc, "cannot write to output folder")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_unknown_precision(tmp_path):
    proc = run_export(FIXTURE / "checkpoint", tmp_path / "out", "--precisions", "fp32,int4")
    assert_one_line_error(proc, "unknown precision(s) int4")
    assert leftovers(tmp_path) == []


def test_user_saved_checkpoint_exports(tmp_path):
    """save_pretrained by the user (model + processor) -> python -m vlmexport.export, no code edits.

    Also exercises --optimize (fused fp32 graphs must keep PyTorch parity; int8 is quantized
    from them).
    """
    import onnx
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = tmp_path / "my-model"
    AutoModelForImageTextToText.from_pretrained(FIXTURE / "checkpoint").save_pretrained(src)
    AutoProcessor.from_pretrained(FIXTURE / "checkpoint").save_pretrained(src)
    out = tmp_path / "pkg"
    proc = run_export(src, out, "--precisions", "fp32,int8", "--optimize")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "export_report.json").read_text())
    assert report["variants"]["fp32"]["max_abs_logit_diff_vs_pytorch"] <= 1e-4
    assert report["variants"]["fp32"]["greedy_tokens_agree"] == 24
    variants = json.loads((out / "onnx" / "variants.json").read_text())
    assert list(variants["variants"]) == ["fp32", "int8"]
    assert variants["variants"]["fp32"]["graphs"]["decoder_model_merged"]["fused"] is True
    assert variants["variants"]["int8"]["graphs"]["decoder_model_merged"]["fused"] is True
    int8_nodes = [n.op_type for n in onnx.load(out / "onnx" / "decoder_model_merged_int8.onnx").graph.node]
    int8_ops = set(int8_nodes)
    assert {"SkipSimplifiedLayerNormalization", "MatMulNBits"} <= int8_ops, int8_ops
    # Each layer's query/key/value and gate/up projections are merged: 4 products a layer, and the LM head.
    layers = json.loads((FIXTURE / "checkpoint/config.json").read_text())["text_config"]["num_hidden_layers"]
    assert int8_nodes.count("MatMulNBits") == 4 * layers + 1
    assert not int8_ops & {"DynamicQuantizeLinear", "MatMulInteger"}, int8_ops
    vision_ops = {n.op_type for n in onnx.load(out / "onnx" / "vision_encoder_int8.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= vision_ops, vision_ops
    assert report["variants"]["int8"]["teacher_forced_argmax_agree"] >= 10
    assert report["optimized_fp32_max_abs_diff"]["decoder_model_merged"] <= 1e-4
    decoder = onnx.load(out / "onnx" / "decoder_model_merged.onnx").graph
    assert "SkipSimplifiedLayerNormalization" in {n.op_type for n in decoder.node}
    assert cache_copies(decoder) == 0
    assert sorted(p.name for p in (out / "onnx").glob("*.onnx")) == [
        "decoder_model_merged.onnx",
        "decoder_model_merged_int8.onnx",
        "embed_tokens.onnx",
        "embed_tokens_int8.onnx",
        "vision_encoder.onnx",
        "vision_encoder_int8.onnx",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def cache_copies(graph) -> int:
    """Expand nodes that repeat a cached key/value head for its group of query heads
    (transformers' repeat_kv: present -> Unsqueeze -> Expand), which grouped attention
    avoids."""
    producers = {output: node for node in graph.node for output in node.output}

    def reads_cache(node) -> bool:
        source = producers.get(node.input[0])
        return source is not None and source.op_type == "Unsqueeze" and source.input[0].startswith("present.")

    return sum(node.op_type == "Expand" and reads_cache(node) for node in graph.node)
