#!/usr/bin/env python
"""Would a decoder built on ONNX Runtime's fused attention op decode faster than ours?

    .venv/bin/python bench/fused_attention_trial.py --package bench/models/smolvlm-256m-shaped/package-optimized \\
        --fused-package bench/models/smolvlm-256m-shaped/package-fused

Builds the benchmark model's text decoder (SmolLM2-135M shapes, random weights) the way ONNX
Runtime GenAI's model builder does: one com.microsoft.GroupQueryAttention per layer (rotary
inside, past and present bound to one buffer so a step writes its position in place),
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, about 390 nodes against our
exported decoder's ~1650. Its INT8 and FP16 variants are made by the export's own quantizer and
fp16 converter (FP16: the op's precision on CUDA, which has no float32 kernel for it).
Then it times one decode step of each (ONNX Runtime's default CPU session options for both,
steps interleaved, median of --steps) at every --contexts cached positions and --batch rows:
the fused decoder with its shared buffer against the package's decoder with the context in
its older cache block, as vlmserve feeds it. With --fused-package (an `export --attention
fused` package of the same model), also that package's decoder, its buffers bound in place
as vlmserve binds them. A trial: speed only, the built graph's weights are random and nothing
checks its outputs; docs/benchmarks.md records what it showed.
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

from vlmexport.export.precision import to_fp16, to_int8_blockwise
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
        # Named as the exporter names nodes: the fp16 converter names its casts after them.
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"node_{outputs[0]}", domain=domain, **attrs))

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


class Place:
    """Where sessions run and their cache buffers live: the CPU, or a CUDA device (--cuda),
    where every cache buffer is device memory bound through IoBinding and only the logits
    come back to the host."""

    def __init__(self, cuda: bool, cuda_graph: bool = False):
        self.device = "cuda" if cuda else "cpu"
        self.cuda_graph = cuda_graph

    def session(self, path: Path, graph: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.device == "cpu":
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        cuda = {"enable_cuda_graph": "1"} if graph else {}
        return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda)])

    def value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)


def typed(session: ort.InferenceSession):
    """array -> the element type the session's input `name` takes (fp16 graphs take their
    cache in fp16, their other inputs in fp32)."""
    types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in session.get_inputs()}
    return lambda name, array: array.astype(types[name]) if types.get(name) else array


def fused_step(path: Path, context: int, batch: int, rng, place: Place, graph: bool = False):
    """One step at `context` cached positions, past and present bound to the same buffers. With
    `graph` (CUDA only), the CUDA provider captures the step as a CUDA graph on its first run and
    replays it: every input then lives at a fixed device address."""
    s = place.session(path, graph)
    as_input = typed(s)
    binding = s.io_binding()
    for i in range(LAYERS):
        for kv in ("key", "value"):
            name = f"past_key_values.{i}.{kv}"
            buffer = place.value(as_input(name, rng.standard_normal((batch, KV_HEADS, context + 1, HEAD_DIM))))
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(f"present.{i}.{kv}", buffer)
    logits = place.value(np.zeros((batch, 1, VOCAB_SIZE), np.float32)) if graph else None
    if logits is None:
        binding.bind_output("logits")
    else:
        binding.bind_ortvalue_output("logits", logits)
    small = {
        "inputs_embeds": rng.standard_normal((batch, 1, HIDDEN)).astype(np.float32),
        "seqlens_k": np.full(batch, context, np.int32),
    }
    kept = {name: place.value(array) for name, array in small.items()}
    for name, value in kept.items():
        binding.bind_ortvalue_input(name, value)
    # GroupQueryAttention reads total_sequence_length on the host.
    binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))

    def step():
        s.run_with_iobinding(binding)
        if logits is not None:
            logits.numpy()  # the host's copy of the logits, as sampling needs

    return step


def package_step(path: Path, context: int, batch: int, rng, place: Place):
    """One step of the exported decoder with `context` positions in its older block, an empty
    recent one (on a device, the cache stays there; outputs are allocated by the session)."""
    s = place.session(path)
    as_input = typed(s)
    binding = s.io_binding()
    for i in range(LAYERS):
        for kv in ("key", "value"):
            older, past = f"older_key_values.{i}.{kv}", f"past_key_values.{i}.{kv}"
            cached = rng.standard_normal((batch, KV_HEADS, context, HEAD_DIM)).astype(np.float32)
            binding.bind_ortvalue_input(older, place.value(as_input(older, cached)))
            empty = np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
            binding.bind_ortvalue_input(past, place.value(as_input(past, empty)))
            binding.bind_output(f"present.{i}.{kv}", place.device)
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", rng.standard_normal((batch, 1, HIDDEN)).astype(np.float32))
    binding.bind_cpu_input("attention_mask", np.ones((batch, context + 1), np.int64))
    binding.bind_cpu_input("position_ids", np.full((batch, 1), context, np.int64))
    return lambda: s.run_with_iobinding(binding)


def exported_fused_step(path: Path, context: int, batch: int, rng, place: Place):
    """One step of an exported fused decoder (`export --attention fused`) at `context` cached
    positions, each buffer 64 columns longer and bound as both past and present."""
    s = place.session(path)
    as_input = typed(s)
    binding = s.io_binding()
    buffers = []
    for i in range(LAYERS):
        for kv in ("key", "value"):
            name = f"past_key_values.{i}.{kv}"
            shape = (batch, KV_HEADS, context + 64, HEAD_DIM)
            buffers.append(place.value(as_input(name, rng.standard_normal(shape))))
            binding.bind_ortvalue_input(name, buffers[-1])
            binding.bind_ortvalue_output(f"present.{i}.{kv}", buffers[-1])
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", rng.standard_normal((batch, 1, HIDDEN)).astype(np.float32))
    binding.bind_cpu_input("attention_mask", np.ones((batch, context + 1), np.int64))
    binding.bind_cpu_input("position_ids", np.full((batch, 1), context, np.int64))
    return lambda: (s.run_with_iobinding(binding), buffers)


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
    parser.add_argument("--fused-package", type=Path, help="an export --attention fused package of the same model")
    parser.add_argument("--contexts", default="100,1150")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,int8", help="of fp32, fp16, int8 (the package's too)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cuda", action="store_true", help="on the CUDA provider, the cache in device memory")
    parser.add_argument("--cuda-graph", action="store_true", help="with --cuda, also the fused decoder as a CUDA graph")
    args = parser.parse_args()
    place = Place(args.cuda)
    with tempfile.TemporaryDirectory() as tmp:
        fused = {p: Path(tmp) / f"decoder_gqa_{p}.onnx" for p in ("fp32", "fp16", "int8")}
        build_fused_decoder(fused["fp32"])
        derive = {"fp16": lambda src, dst: to_fp16(src, dst, check=False), "int8": to_int8_blockwise}
        for precision in set(args.precisions.split(",")) & derive.keys():
            derive[precision](fused["fp32"], fused[precision])
        for precision in args.precisions.split(","):
            suffix = "" if precision == "fp32" else f"_{precision}"
            ours = args.package / "onnx" / f"decoder_model_merged{suffix}.onnx"
            for context in map(int, args.contexts.split(",")):
                rng = np.random.default_rng(0)
                steps = {
                    "fused": fused_step(fused[precision], context, args.batch, rng, place),
                    "package": package_step(ours, context, args.batch, rng, place),
                }
                if args.fused_package:
                    exported = args.fused_package / "onnx" / f"decoder_model_merged{suffix}.onnx"
                    steps["exported fused"] = exported_fused_step(exported, context, args.batch, rng, place)
                if args.cuda and args.cuda_graph:
                    try:
                        steps["fused graph"] = fused_step(fused[precision], context, args.batch, rng, place, True)
                        steps["fused graph"]()
                    except Exception as e:  # reported; the other figures still count
                        steps.pop("fused graph", None)
                        print(f"{precision}: the fused decoder as a CUDA graph failed: {e}", flush=True)
                ms = median_ms(steps, args.steps)
                graph = f", fused as a CUDA graph {ms['fused graph']:.2f} ms" if "fused graph" in ms else ""
                if "exported fused" in ms:
                    graph += f", exported fused package {ms['exported fused']:.2f} ms"
                print(
                    f"{place.device} {precision} batch {args.batch} context {context}: fused attention "
                    f"{ms['fused']:.2f} ms, package {ms['package']:.2f} ms per step "
                    f"({ms['package'] / ms['fused']:.2f}x){graph}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
