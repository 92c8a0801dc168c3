#!/usr/bin/env python3
"""One SigLIP tile through the vision encoder graph of a package: ONNX Runtime against
OpenVINO's runtime on the same ONNX file, in the same process, alternated.

    python3 -m venv bench/.venv-openvino
    bench/.venv-openvino/bin/pip install -r bench/openvino-requirements.txt
    bench/.venv-openvino/bin/python bench/vision_openvino.py \\
        --package bench/models/smolvlm-256m-shaped/package-optimized --out docs/benchmarks.md

Peers: ONNX Runtime FP32 (what vlmserve runs), OpenVINO with INFERENCE_PRECISION_HINT f32 and
bf16 (OpenVINO's default on CPUs with AVX512_BF16 or AMX, which `OVModelForVisualCausalLM` and
`benchmark_app` use unless told otherwise), and ONNX Runtime on the package's INT8 graph.
Reports each one's median time per tile over alternated rounds, the ratio to ONNX Runtime FP32,
the implied GFLOP/s (212 GFLOP per SigLIP-base 512x512 tile) and the largest difference of its
features from ONNX Runtime FP32's.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
from docs_section import alternated_medians, publish

GFLOP_PER_TILE = 212


def ort_runner(path: Path, feeds: dict):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    used = {k: v for k, v in feeds.items() if k in names}
    return lambda: session.run(None, used)[0]


def ov_runner(core: ov.Core, path: Path, feeds: dict, precision: str):
    compiled = core.compile_model(
        core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()
    names = {i.get_any_name() for i in compiled.inputs}
    used = {k: v for k, v in feeds.items() if k in names}
    return lambda: request.infer(used)[compiled.outputs[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="per peer and round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    onnx_dir = Path(args.package) / "onnx"
    rng = np.random.default_rng(0)
    feeds = {
        "pixel_values": rng.standard_normal((1, 3, 512, 512)).astype(np.float32),
        "pixel_attention_mask": np.ones((1, 512, 512), bool),
    }
    core = ov.Core()
    fp32 = onnx_dir / "vision_encoder.onnx"
    peers = {
        "ONNX Runtime FP32": ort_runner(fp32, feeds),
        "OpenVINO f32": ov_runner(core, fp32, feeds, "f32"),
        "OpenVINO bf16 (its default here)": ov_runner(core, fp32, feeds, "bf16"),
        "ONNX Runtime INT8 graph": ort_runner(onnx_dir / "vision_encoder_int8.onnx", feeds),
    }
    reference = peers["ONNX Runtime FP32"]()
    drift = {name: float(np.abs(run() - reference).max()) for name, run in peers.items()}
    medians = alternated_medians(peers, args.rounds, args.runs)
    base = medians["ONNX Runtime FP32"]
    capabilities = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    publish(
        args.out,
        "Vision encoder: ONNX Runtime against OpenVINO on one tile",
        f"`bench/.venv-openvino/bin/python bench/vision_openvino.py --package {args.package}`, "
        f"{datetime.date.today()}: OpenVINO {ov.__version__.split('-')[0]}, onnxruntime {ort.__version__}, "
        f"one 512x512 tile, {args.rounds} alternated rounds of {args.runs} runs per peer; medians. "
        f"OpenVINO's CPU capabilities here: {capabilities}; its default inference precision: {default}.",
        ["peer", "per tile", "ratio to ONNX Runtime FP32", "GFLOP/s", "max abs diff of features"],
        [
            [name, f"{m:.3f} s", f"{m / base:.2f}", f"{GFLOP_PER_TILE / m:.0f}", f"{drift[name]:.3g}"]
            for name, m in medians.items()
        ],
    )


if __name__ == "__main__":
    main()
