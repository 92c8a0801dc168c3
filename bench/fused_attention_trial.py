#!/usr/bin/env python
"""Would a decoder built on ONNX Runtime's fused attention op decode faster than ours?

    .venv/bin/python bench/fused_attention_trial.py --package bench/models/smolvlm-256m-shaped/package-optimized

Builds the benchmark model's text decoder (SmolLM2-135M shapes, random weights) the way ONNX
Runtime GenAI's model builder does: one com.microsoft.GroupQueryAttention per layer (rotary
inside, past and present bound to one buffer so a step writes its position in place),
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, about 390 nodes against our
exported decoder's ~1650. Its INT8 variant is made by the export's own blockwise quantizer.
Then it times one decode step of each (ONNX Runtime's default CPU session options for both,
steps interleaved, median of --steps) at every --contexts cached positions and --batch rows:
the fused decoder with its shared buffer against the package's decoder with the context in
its older cache block, as vlmserve feeds it. A trial: speed only, the built graph's weights
are random and nothing checks its outputs; docs/benchmarks.md records what it showed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# The vlmexport package from export/, whether installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))

from vlmexport.export.precision import to_int8_blockwise
from vlmexport.fixtures.bench_model import ROPE_THETA, TEXT_SIZES, VOCAB_SIZE

HIDDEN = TEXT_SIZES["hidden_size"]
LAYERS = TEXT_SIZES["num_hidden_layers"]
HEADS = TEXT_SIZES["num_attention_heads"]
KV_HEADS = TEXT_SIZES["num_key_value_heads"]
HEAD_DIM = TEXT_SIZES["head_dim"]
EPS = TEXT_SIZES["rms_norm_eps"]
# The ops this graph takes from the default domain (ONNX Runtime registers
# SimplifiedLayerNormalization there); the rest are com.microsoft contrib ops.
ONNX_DOMAIN_OPS = {"MatMul", "Mul", "Sigmoid", "SimplifiedLayerNormalization"}


class GraphBuilder:
    """Nodes and random initializers of one graph."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers = [], []

    def weight(self, name: str, shape: tuple, ones: bool = False) -> str:
        value = np.ones(shape, np.float32) if ones else (self.rng.standard_normal(shape) * 0.02).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list, outputs: list, **attrs) -> None:
        domain = "" if op in ONNX_DOMAIN_OPS else "com.microsoft"
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        self.node("MatMul", [x, self.weight(f"{name}.weight", (n_in, n_out))], [name])
        return name


def rotary_caches(builder: GraphBuilder) -> None:
    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    freqs = np.outer(np.arange(TEXT_SIZES["max_position_embeddings"]), inv_freq)
    for name, f in (("cos_cache", np.cos), ("sin_cache", np.sin)):
        builder.initializers.append(numpy_helper.from_array(f(freqs).astype(np.float32), name))


def layer(b: GraphBuilder, i: int, x: str, skip: str | None) -> tuple[str, str]:
    """One transformer block; returns (MLP output, residual) for the next block's skip norm."""
    p = f"layers.{i}"
    if skip is None:
        b.node(
            "SimplifiedLayerNormalization",
            [x, b.weight(f"{p}.ln1", (HIDDEN,), True)],
            [f"{p}.n1"],
            epsilon=EPS,
            axis=-1,
        )
        residual = x
    else:
        b.node(
            "SkipSimplifiedLayerNormalization",
            [x, skip, b.weight(f"{p}.ln1", (HIDDEN,), True)],
            [f"{p}.n1", "", "", f"{p}.r1"],
            epsilon=EPS,
        )
        residual = f"{p}.r1"
    q = b.linear(f"{p}.n1", f"{p}.q", HIDDEN, HEADS * HEAD_DIM)
    k = b.linear(f"{p}.n1", f"{p}.k", HIDDEN, KV_HEADS * HEAD_DIM)
    v = b.linear(f"{p}.n1", f"{p}.v", HIDDEN, KV_HEADS * HEAD_DIM)
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    b.node(
        "GroupQueryAttention",
        [q, k, v, *past, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        do_rotary=1,
    )
    o = b.linear(f"{p}.attn", f"{p}.o", HEADS * HEAD_DIM, HIDDEN)
    b.node(
        "SkipSimplifiedLayerNormalization",
        [o, residual, b.weight(f"{p}.ln2", (HIDDEN,), True)],
        [f"{p}.n2", "", "", f"{p}.r2"],
        epsilon=EPS,
    )
    gate = b.linear(f"{p}.n2", f"{p}.gate", HIDDEN, TEXT_SIZES["intermediate_size"])
    up = b.linear(f"{p}.n2", f"{p}.up", HIDDEN, TEXT_SIZES["intermediate_size"])
    b.node("Sigmoid", [gate], [f"{p}.sig"])
    b.node("Mul", [gate, f"{p}.sig"], [f"{p}.silu"])
    b.node("Mul", [f"{p}.silu", up], [f"{p}.act"])
    return b.linear(f"{p}.act", f"{p}.down", TEXT_SIZES["intermediate_size"], HIDDEN), f"{p}.r2"


def build_fused_decoder(path: Path) -> None:
    b = GraphBuilder()
    rotary_caches(b)
    kv_shape = ["batch", KV_HEADS, "buffer", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB_SIZE])]
    for i in range(LAYERS):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, kv_shape))
    x, skip = "inputs_embeds", None
    for i in range(LAYERS):
        x, skip = layer(b, i, x, skip)
    b.node("SkipSimplifiedLayerNormalization", [x, skip, b.weight("norm", (HIDDEN,), True)], ["final"], epsilon=EPS)
    b.linear("final", "logits", HIDDEN, VOCAB_SIZE)
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_step(path: Path, context: int, batch: int, rng):
    """One step at `context` cached positions, past and present bound to the same buffers."""
    s = session(path)
    binding = s.io_binding()
    for i in range(LAYERS):
        for kv in ("key", "value"):
            buffer = ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((batch, KV_HEADS, context + 1, HEAD_DIM)).astype(np.float32)
            )
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buffer)
            binding.bind_ortvalue_output(f"present.{i}.{kv}", buffer)
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", rng.standard_normal((batch, 1, HIDDEN)).astype(np.float32))
    binding.bind_cpu_input("seqlens_k", np.full(batch, context, np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))
    return lambda: s.run_with_iobinding(binding)


def package_step(path: Path, context: int, batch: int, rng):
    """One step of the exported decoder with `context` positions in its older block, an empty recent one."""
    s = session(path)
    binding = s.io_binding()
    for i in range(LAYERS):
        for kv in ("key", "value"):
            older = rng.standard_normal((batch, KV_HEADS, context, HEAD_DIM)).astype(np.float32)
            binding.bind_ortvalue_input(f"older_key_values.{i}.{kv}", ort.OrtValue.ortvalue_from_numpy(older))
            empty = np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", ort.OrtValue.ortvalue_from_numpy(empty))
            binding.bind_output(f"present.{i}.{kv}")
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", rng.standard_normal((batch, 1, HIDDEN)).astype(np.float32))
    binding.bind_cpu_input("attention_mask", np.ones((batch, context + 1), np.int64))
    binding.bind_cpu_input("position_ids", np.full((batch, 1), context, np.int64))
    return lambda: s.run_with_iobinding(binding)


def median_ms(steps: dict, count: int) -> dict:
    for step in steps.values():
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="an export.py package of the benchmark model")
    parser.add_argument("--contexts", default="100,1150")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fused = {"fp32": Path(tmp) / "decoder_gqa.onnx", "int8": Path(tmp) / "decoder_gqa_int8.onnx"}
        build_fused_decoder(fused["fp32"])
        to_int8_blockwise(fused["fp32"], fused["int8"])
        for precision in args.precisions.split(","):
            suffix = "" if precision == "fp32" else f"_{precision}"
            ours = args.package / "onnx" / f"decoder_model_merged{suffix}.onnx"
            for context in map(int, args.contexts.split(",")):
                rng = np.random.default_rng(0)
                steps = {
                    "fused": fused_step(fused[precision], context, args.batch, rng),
                    "package": package_step(ours, context, args.batch, rng),
                }
                ms = median_ms(steps, args.steps)
                print(
                    f"{precision} batch {args.batch} context {context}: fused attention {ms['fused']:.1f} ms, "
                    f"package {ms['package']:.1f} ms per step ({ms['package'] / ms['fused']:.2f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
