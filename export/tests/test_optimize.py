"""--optimize's projection merge: the MatMuls with a constant weight that read one activation
become one MatMul and a Split, with the same values in fp32 and in the int8 blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmexport.export import precision
from vlmexport.export.optimize import merge_shared_input_matmuls


def projections_graph(path):
    """x feeds three projections (widths 128, 64, 64) and x * 2 a fourth, alone; the second
    projection's output is read twice."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(256, n)).astype(np.float32), name)
        for name, n in (("q", 128), ("k", 64), ("v", 64), ("o", 32))
    ]
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("MatMul", ["x", "q"], ["yq"]),
        helper.make_node("MatMul", ["x", "k"], ["yk"]),
        helper.make_node("Mul", ["x", "two"], ["doubled"]),
        helper.make_node("MatMul", ["doubled", "o"], ["yo"]),
        helper.make_node("MatMul", ["x", "v"], ["yv"]),
        helper.make_node("Add", ["yk", "yv"], ["kv"]),
        helper.make_node("Neg", ["yk"], ["nk"]),
    ]
    outputs = [("yq", 128), ("kv", 64), ("nk", 64), ("yo", 32)]
    graph = helper.make_graph(
        nodes,
        "projections",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 256])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3, n]) for name, n in outputs],
        [*weights, two],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_projections_reading_one_activation_merge_without_changing_values(tmp_path):
    src, merged = tmp_path / "g.onnx", tmp_path / "merged.onnx"
    projections_graph(src)
    model = onnx.load(src)
    assert merge_shared_input_matmuls(model) == 1
    onnx.checker.check_model(model)
    onnx.save(model, merged)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1, ops
    assert sorted(i.name for i in model.graph.initializer if i.name in {"q", "k", "v", "o"}) == ["o"]
    x = np.random.default_rng(1).normal(size=(2, 3, 256)).astype(np.float32)
    for want, got in zip(run(src, x), run(merged, x)):
        np.testing.assert_array_equal(got, want)

    # The int8 blocks are per column, so the merged graph's int8 variant computes the same values.
    for path in (src, merged):
        precision.to_int8_blockwise(path, path.with_name(f"{path.stem}_int8.onnx"))
    for want, got in zip(run(tmp_path / "g_int8.onnx", x), run(tmp_path / "merged_int8.onnx", x)):
        np.testing.assert_array_equal(got, want)
