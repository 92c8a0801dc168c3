"""fp16 conversion of graphs whose constants the exporter shared between ops kept in fp32 and
ops converted to fp16 (freshly initialised models: every zero bias is one tensor)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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


def angles_and_buckets_graph(path, patches: int):
    """The two float computations whose results must not pass through fp16: rotary angles
    (position * inv_freq, read by Cos and Sin) and patch coordinates k/n bucketed against
    boundaries (idefics3's patch position ids; each coordinate read by two comparisons)."""
    inv_freq = numpy_helper.from_array((1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32), "inv_freq")
    boundaries = numpy_helper.from_array(np.arange(1 / patches, 1.0, 1 / patches, dtype=np.float32), "boundaries")
    scalars = [
        numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero", 0), ("one", 1), ("axis", [1]))
    ]
    nodes = [
        helper.make_node("Cast", ["positions"], ["positions_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["positions_f", "axis"], ["positions_col"]),
        helper.make_node("Mul", ["positions_col", "inv_freq"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]),
        helper.make_node("Sin", ["angles"], ["sin"]),
        helper.make_node("Range", ["zero", "count", "one"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["steps_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["steps_f", "count_f"], ["coords"]),
        helper.make_node("Unsqueeze", ["coords", "axis"], ["coords_col"]),
        helper.make_node("LessOrEqual", ["boundaries", "coords_col"], ["passed"]),
        helper.make_node("Greater", ["boundaries", "coords_col"], ["ahead"]),
        helper.make_node("Cast", ["passed"], ["passed_i"], to=TensorProto.INT64),
        helper.make_node("Cast", ["ahead"], ["ahead_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["passed_i", "axis"], ["bucket"], keepdims=0),
        helper.make_node("ReduceSum", ["ahead_i", "axis"], ["buckets_ahead"], keepdims=0),
    ]
    for node in nodes:  # the converter names its casts after the nodes, as the exporter's are named
        node.name = f"node_{node.output[0]}"
    graph = helper.make_graph(
        nodes,
        "angles_and_buckets",
        [
            helper.make_tensor_value_info("positions", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("count", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("bucket", TensorProto.INT64, ["k"]),
            helper.make_tensor_value_info("buckets_ahead", TensorProto.INT64, ["k"]),
        ],
        [inv_freq, boundaries, *scalars],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_fp16_conversion_keeps_rotary_angles_and_patch_positions_exact(tmp_path):
    src, dst = tmp_path / "g.onnx", tmp_path / "g_fp16.onnx"
    angles_and_buckets_graph(src, patches=10)
    precision.to_fp16(src, dst)
    feeds = {"positions": np.arange(0, 2000, 7, dtype=np.int64), "count": np.array(10, np.int64)}
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    # Nothing upstream of Cos, Sin or a comparison is computed in fp16: cos and sin differ only
    # by their own rounding to fp16 (through fp16 angles they were off by up to 0.05), the
    # buckets not at all (a tenth of them moved).
    for name, w, g in zip(("cos", "sin"), want, got):
        np.testing.assert_allclose(g, w, atol=5e-4, rtol=0, err_msg=name)
    for name, w, g in zip(("bucket", "buckets_ahead"), want[2:], got[2:]):
        np.testing.assert_array_equal(g, w, err_msg=name)


def projections_graph(path, shared: bool = True):
    """x feeds three projections (widths 128, 64, 64) and x * 2 a fourth, alone; the second
    projection's output is read twice. Not `shared`, each projection reads its own Identity
    of x, so none merge: the same values without the merge."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(256, n)).astype(np.float32), name)
        for name, n in (("q", 128), ("k", 64), ("v", 64), ("o", 32))
    ]
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    inputs = {name: "x" if shared else f"x_{name}" for name in "qkv"}
    copies = [] if shared else [helper.make_node("Identity", ["x"], [x]) for x in inputs.values()]
    nodes = [
        *copies,
        helper.make_node("MatMul", [inputs["q"], "q"], ["yq"]),
        helper.make_node("MatMul", [inputs["k"], "k"], ["yk"]),
        helper.make_node("Mul", ["x", "two"], ["doubled"]),
        helper.make_node("MatMul", ["doubled", "o"], ["yo"]),
        helper.make_node("MatMul", [inputs["v"], "v"], ["yv"]),
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


def run_on(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_projections_reading_one_activation_merge_without_changing_values(tmp_path):
    src, merged = tmp_path / "g.onnx", tmp_path / "merged.onnx"
    projections_graph(src)
    model = onnx.load(src)
    assert precision.merge_shared_input_matmuls(model) == 1
    onnx.checker.check_model(model)
    onnx.save(model, merged)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1, ops
    assert sorted(i.name for i in model.graph.initializer if i.name in {"q", "k", "v", "o"}) == ["o"]
    x = np.random.default_rng(1).normal(size=(2, 3, 256)).astype(np.float32)
    for want, got in zip(run_on(src, x), run_on(merged, x)):
        np.testing.assert_array_equal(got, want)


def test_int8_decoder_merges_projections_with_the_values_of_separate_ones(tmp_path):
    """MatMulNBits quantizes each column's blocks alone: merged or not, the same int8 values."""
    shared, separate = tmp_path / "shared.onnx", tmp_path / "separate.onnx"
    projections_graph(shared)
    projections_graph(separate, shared=False)
    for path in (shared, separate):
        precision.to_int8_blockwise(path, path.with_name(f"{path.stem}_int8.onnx"))
    quantized = {p: onnx.load(tmp_path / f"{p}_int8.onnx").graph.node for p in ("shared", "separate")}
    assert [n.op_type for n in quantized["shared"]].count("MatMulNBits") == 2
    assert [n.op_type for n in quantized["separate"]].count("MatMulNBits") == 4
    x = np.random.default_rng(1).normal(size=(2, 3, 256)).astype(np.float32)
    for want, got in zip(run_on(tmp_path / "separate_int8.onnx", x), run_on(tmp_path / "shared_int8.onnx", x)):
        np.testing.assert_array_equal(got, want)


def embedding_graph(path, table):
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embeds"])],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [1, "s", table.shape[1]])],
        [numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


@pytest.mark.parametrize("width,block", [(64, 32), (24, 24)])
def test_int8_token_table_keeps_each_block_within_half_its_scale(tmp_path, width, block):
    """Blocks of 32 columns where the width allows, else whole rows; each block scaled alone."""
    rng = np.random.default_rng(2)
    table = rng.normal(size=(50, width)).astype(np.float32)
    table[7] = 0  # a block of zeros has scale 0 and must come back as zeros, not NaN
    table[9, :block] *= 100  # a large block costs the others nothing
    src, dst = tmp_path / "embed.onnx", tmp_path / "embed_int8.onnx"
    embedding_graph(src, table)
    precision.to_int8_table(src, dst)
    quantized = onnx.load(dst)
    onnx.checker.check_model(quantized)
    kinds = {i.name: i.data_type for i in quantized.graph.initializer if i.data_type != TensorProto.INT64}
    assert kinds == {"table.int8": TensorProto.INT8, "table.scale": TensorProto.FLOAT}, kinds
    ids = np.array([[0, 7, 9, 49, 9]])
    (got,) = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    want = table[ids]
    blocks = want.reshape(1, 5, width // block, block)
    half_step = np.repeat(np.abs(blocks).max(axis=-1) / 127 / 2, block, axis=-1)
    assert np.all(np.abs(got - want) <= half_step * (1 + 1e-5)), np.abs(got - want).max()
    np.testing.assert_array_equal(got[0, 1], 0)
    assert np.abs(got - want).max() > 0  # it was quantized, not copied
