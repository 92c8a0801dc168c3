#!/usr/bin/env python3
"""Levers for the vision encoder on CPU, each timed against the package's FP32 graph in the
same process, alternated, one 512x512 tile:

    .venv/bin/python bench/vision_levers.py --package bench/models/smolvlm-256m-shaped/package-optimized \\
        --unoptimized bench/models/smolvlm-256m-shaped/package --out docs/benchmarks.md

- fused attention: each layer's Softmax(Add(Mul(MatMul(q, k), scale), mask)), its MatMul with v
  and the Transpose and Reshape after it rewritten into one com.microsoft.MultiHeadAttention on
  the flat q, k, v with the mask as attention_bias (what neither the `vit` nor the `clip`
  optimizer type of onnxruntime.transformers fuses for SigLIP);
- one intra-op thread instead of one per core;
- the FP16 graph (from --unoptimized: the export derives it from the unfused graph);
- the dynamic INT8 graph (MatMulInteger), and a static one: onnxruntime `quantize_static`, QDQ,
  MatMul only, per tensor, calibrated on 4 random tiles.

Prints each variant's median time per tile, its ratio to FP32 and the largest difference of its
features from FP32's, and the share of FP32's kernel time spent in MatMul (ONNX Runtime's
profiler).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from docs_section import alternated_medians, publish
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def fuse_attention(src: Path, dst: Path) -> int:
    """Rewrite each attention of the vision graph into MultiHeadAttention; returns how many."""
    model = onnx.load(src)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    config = json.loads((src.parent.parent / "config.json").read_text())
    num_heads = config["vision_config"]["num_attention_heads"]

    def flat(name: str) -> str:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape"):
            name = node.input[0]
            node = producer.get(name)
        return name

    replaced, fused = {}, 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = producer.get(softmax.input[0])
        mul = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        qk = producer.get(mul.input[0]) if mul is not None and mul.op_type == "Mul" else None
        scale = initializers.get(mul.input[1]) if mul is not None else None
        users = consumers[softmax.output[0]]
        if qk is None or qk.op_type != "MatMul" or scale is None or scale.size != 1 or len(users) != 1:
            continue
        weighted = users[0]
        transpose = consumers[weighted.output[0]][0]
        reshape = consumers[transpose.output[0]][0]
        if weighted.op_type != "MatMul" or transpose.op_type != "Transpose" or reshape.op_type != "Reshape":
            continue
        replaced[id(reshape)] = helper.make_node(
            "MultiHeadAttention",
            [flat(qk.input[0]), flat(qk.input[1]), flat(weighted.input[1]), "", "", add.input[1]],
            [reshape.output[0]],
            domain="com.microsoft",
            num_heads=num_heads,
            scale=float(scale.reshape(-1)[0]),
        )
        fused += 1
    nodes = [replaced.get(id(n), n) for n in graph.node]
    # Keep what the outputs still need, in order.
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst)
    return fused


class Tiles(CalibrationDataReader):
    def __init__(self, count: int):
        rng = np.random.default_rng(1)
        self.tiles = iter(
            {
                "pixel_values": rng.uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32),
                "pixel_attention_mask": np.ones((1, 512, 512), bool),
            }
            for _ in range(count)
        )

    def get_next(self):
        return next(self.tiles, None)


def session(path: Path, threads: int = 0, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def matmul_share(path: Path, feeds: dict) -> float:
    profiled = session(path, profile=True)
    for _ in range(2):
        profiled.run(None, feeds)
    trace = Path(profiled.end_profiling())
    kernel = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    return sum(v for k, v in kernel.items() if "MatMul" in k) / sum(kernel.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="the package vlmserve runs (with --optimize)")
    parser.add_argument("--unoptimized", required=True, help="the same model exported without --optimize")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    fp32 = Path(args.package) / "onnx" / "vision_encoder.onnx"
    plain = Path(args.unoptimized) / "onnx"
    rng = np.random.default_rng(0)
    feeds = {
        "pixel_values": rng.standard_normal((1, 3, 512, 512)).astype(np.float32),
        "pixel_attention_mask": np.ones((1, 512, 512), bool),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "onnx" / "vision_encoder.onnx"
        fused.parent.mkdir()
        (Path(tmp) / "config.json").write_text((Path(args.package) / "config.json").read_text())
        fused_count = fuse_attention(fp32, fused)
        static = Path(tmp) / "vision_encoder_qdq.onnx"
        quantize_static(
            str(plain / "vision_encoder.onnx"),
            str(static),
            Tiles(4),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
        )
        variants = {
            "FP32 (package)": session(fp32),
            f"FP32, attention fused ({fused_count} MultiHeadAttention)": session(fused),
            "FP32, one intra-op thread": session(fp32, threads=1),
            "FP16 graph": session(plain / "vision_encoder_fp16.onnx"),
            "INT8 graph, dynamic (MatMulInteger)": session(plain / "vision_encoder_int8.onnx"),
            "INT8, static QDQ": session(static),
        }
        share = matmul_share(fp32, feeds)
    reference = variants["FP32 (package)"].run(None, feeds)[0]
    drift = {
        name: float(np.abs(s.run(None, feeds)[0].astype(np.float32) - reference).max()) for name, s in variants.items()
    }
    medians = alternated_medians({name: lambda s=s: s.run(None, feeds) for name, s in variants.items()}, args.rounds, 2)
    base = medians["FP32 (package)"]
    publish(
        args.out,
        "Vision encoder levers on CPU",
        f"`.venv/bin/python bench/vision_levers.py --package {args.package} --unoptimized {args.unoptimized}`, "
        f"{datetime.date.today()}: onnxruntime {ort.__version__}, one 512x512 tile, {args.rounds} alternated "
        f"rounds of 2 runs per variant; medians. MatMul is {share:.0%} of the FP32 graph's kernel time.",
        ["variant", "per tile", "ratio to FP32", "max abs diff of features"],
        [[name, f"{m:.3f} s", f"{m / base:.2f}", f"{drift[name]:.3g}"] for name, m in medians.items()],
    )


if __name__ == "__main__":
    main()
