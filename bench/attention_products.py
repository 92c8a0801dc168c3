#!/usr/bin/env python
"""The two products of a decode step's attention over a long cache, alone, in every form ONNX
Runtime's CPU ops offer.

    .venv/bin/python bench/attention_products.py --positions 1150

SmolLM2-135M's shapes (the SmolVLM-256M-shaped benchmark decoder): 9 query heads over 3
key/value heads of 64, 30 layers, each layer its own cache block so that a step reads the
whole cache as the decoder does. Scores (query x keys):
  keys          FusedMatMul with transB over [1, 3, n, 64] keys, the stacked group's 3 rows (the decoder's form)
  keys-first    MatMul over keys stored transposed, [1, 3, 64, n], the stacked rows
  per-head      MatMul over keys stored transposed, one query head per product (a GEMV)
  per-head-tB   FusedMatMul with transB, one query head per product
Weighted values (weights x values):
  per-head      one head's weights per product, the value head broadcast (the decoder's form)
  stacked       the group's 3 rows per product
Each runs the 30 layers as one session, the forms interleaved (fused_attention_trial's
median_ms); medians over --steps. Reading the cache bounds each product from below: its
megabytes over the host's read bandwidth (bench/compare.py's probe).
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from fused_attention_trial import median_ms
from onnx import TensorProto, helper

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def shapes(n: int) -> dict:
    """form -> (query or weights shape, cache block shape, transB)."""
    return {
        "scores: keys": ([1, KV_HEADS, GROUP, HEAD_DIM], [1, KV_HEADS, n, HEAD_DIM], True),
        "scores: keys-first": ([1, KV_HEADS, GROUP, HEAD_DIM], [1, KV_HEADS, HEAD_DIM, n], False),
        "scores: per-head": ([1, KV_HEADS, GROUP, 1, HEAD_DIM], [1, KV_HEADS, 1, HEAD_DIM, n], False),
        "scores: per-head-tB": ([1, KV_HEADS, GROUP, 1, HEAD_DIM], [1, KV_HEADS, 1, n, HEAD_DIM], True),
        "values: per-head": ([1, KV_HEADS, GROUP, 1, n], [1, KV_HEADS, 1, n, HEAD_DIM], False),
        "values: stacked": ([1, KV_HEADS, GROUP, n], [1, KV_HEADS, n, HEAD_DIM], False),
    }


def ort_step(left_shape, block_shape, trans_b: bool, rng):
    """30 products of one left operand with 30 cache blocks, as one session run."""
    inputs = [helper.make_tensor_value_info("left", TensorProto.FLOAT, left_shape)]
    nodes, outputs = [], []
    for i in range(LAYERS):
        inputs.append(helper.make_tensor_value_info(f"block{i}", TensorProto.FLOAT, block_shape))
        if trans_b:
            nodes.append(
                helper.make_node("FusedMatMul", ["left", f"block{i}"], [f"out{i}"], domain="com.microsoft", transB=1)
            )
        else:
            nodes.append(helper.make_node("MatMul", ["left", f"block{i}"], [f"out{i}"]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs), opset_imports=opsets, ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    arrays = {"left": rng.standard_normal(left_shape).astype(np.float32)}
    arrays |= {f"block{i}": rng.standard_normal(block_shape).astype(np.float32) for i in range(LAYERS)}
    for name, array in arrays.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for i in range(LAYERS):
        binding.bind_output(f"out{i}")
    return lambda: session.run_with_iobinding(binding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=1150)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps = {form: ort_step(*spec, rng) for form, spec in shapes(args.positions).items()}
    medians = median_ms(steps, args.steps)
    cache_mb = LAYERS * KV_HEADS * args.positions * HEAD_DIM * 4 / 1e6
    print(f"{args.positions} positions: each product reads {cache_mb:.0f} MB of cache over {LAYERS} layers")
    for name, ms in medians.items():
        print(f"{name:22s} {ms:6.2f} ms per {LAYERS} layers")


if __name__ == "__main__":
    main()
