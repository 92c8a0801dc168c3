"""fp16 conversion of graphs whose constants the exporter shared between ops kept in fp32 and
ops converted to fp16 (freshly initialised models: every zero bias is one tensor)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmexport.export import precision


def shared_bias_graph(path):
    zeros = numpy_helper.from_array(np.zeros(4, np.float32), "zeros")
    ones = numpy_helper.from_array(np.ones(4, np.float32), "ones")
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "weight")
    nodes = [
        # LayerNormalization stays fp32 (block list); the Add after the MatMul goes fp16; both read "zeros".
        helper.make_node("LayerNormalization", ["x", "ones", "zeros"], ["normed"], axis=-1),
        helper.make_node("MatMul", ["normed", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "zeros"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [zeros, ones, weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_fp16_conversion_unshares_constants_read_by_fp32_and_fp16_ops(tmp_path):
    src, dst = tmp_path / "g.onnx", tmp_path / "g_fp16.onnx"
    shared_bias_graph(src)
    precision.to_fp16(src, dst)
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Before the fix ONNX Runtime refused to load this graph (Add bound to float16 and float).
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-2)
