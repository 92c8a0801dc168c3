#!/usr/bin/env python
"""vlmserve against what users would run instead, side by side in one run.

    .venv/bin/python bench/compare.py --out docs/benchmarks.md

Peers, on the same image, prompt and number of new tokens (eos ignored), each run in its own
process (so peak RSS is its own) serving --runs requests. --rounds N makes N rounds per
scenario; a round runs every peer once, the order reversed every other round, so the shared
machine's drift over minutes falls on every peer alike instead of on whichever ran last.
A peer's figure is the median over its rounds of each process's median over its requests (peak
RSS: the largest process's). The peers:
  vlmserve   `target/release/vlmserve bench --json` on package-optimized/ (export.py
             --optimize: ONNX Runtime's fusions, parity-checked) when it exists, else package/.
  onnx_loop  a Python onnxruntime loop as a user would write it: the HF processor, the
             three sessions of package/ (export.py's default flags), the KV cache fed back
             as numpy arrays.
  pytorch    transformers `generate` (eager attention, FP32) on the checkpoint.
  openvino   optimum-intel's `OVModelForVisualCausalLM.generate` on the checkpoint exported
             by bench/openvino_export.py, in bench/.venv-openvino (its own pinned
             environment, bench/openvino-requirements.txt): FP32 weights run with
             INFERENCE_PRECISION_HINT f32; "openvino bf16" is the same IR with OpenVINO's
             default hint, which is bf16 on CPUs with AVX512_BF16 or AMX; with int8 in
             --precisions, "openvino int8" runs the INT8-weight IR (`--weight-format int8`)
             with the default hint, against vlmserve int8.
  openvino_genai  OpenVINO GenAI's C++ `VLMPipeline` (its own image preprocessing, chat
             template and generation loop) on the same IR, with the same three variants. It
             refuses idefics3, so it is the peer for the Qwen2-VL-shaped model (below).
Scenarios: S1 one tile (splitting off), S2 the processor's defaults (a 512x512 image becomes
17 tiles). Time to first token runs from the image file to the first token (processor
included); decode tokens/s is over the tokens after the first. A memory-bandwidth probe gives
the decode ceiling: read bandwidth / bytes a step reads, the decoder's weights and its KV cache
(the probe runs before and after the rounds, so the ceiling is of the same run); a
matrix-product probe gives the FP32 floor under time to first token: the tiles'
vision-encoder FLOPs / the measured rate.
Prints ratios (vlmserve / peer) and checks that all three produce the same greedy FP32 tokens
in every scenario (exits 1 if not, after writing the table).

The model is vlmexport.fixtures.bench_model's: SmolVLM-256M's shapes by default, or with
--model-dir bench/models/qwen2-vl-2b-shaped Qwen2-VL-2B's (random weights either way); its
family comes from the checkpoint's config. A processor that does not split images into tiles
(Qwen2-VL's) has only S1: the image as one picture.

On a GPU host, --cuda runs every peer on the GPU: vlmserve with the CUDA provider on all
graphs, the loop with onnxruntime's CUDAExecutionProvider, PyTorch on cuda; --peer-precision
fp16 puts the loop on the package's fp16 graphs and PyTorch in float16 (the issue's GPU
reference: PyTorch eager FP16; greedy tokens are then compared for information only, since
FP16 peers need not agree with FP32 token for token). The CPU probes are then skipped. --peers
leaves peers out (the GPU check drops onnx_loop where onnxruntime has no CUDA provider).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import machine, write_section

REPO = Path(__file__).resolve().parent.parent
# The vlmexport package from export/, whether installed or not (the GPU host has it unpacked).
sys.path.insert(0, str(REPO / "export"))

PROMPT = "Describe the image."
PEERS = ("vlmserve", "onnx_loop", "pytorch", "openvino", "openvino_genai")
OPENVINO_PYTHON = REPO / "bench/.venv-openvino/bin/python"
DEFAULT_MODEL_DIR = "bench/models/smolvlm-256m-shaped"


def checkpoint_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "checkpoint/config.json").read_text())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs_for(processor, image_path: str, split: bool):
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if hasattr(processor.image_processor, "do_image_splitting"):
        # Set on the image processor: transformers 4.57's processor ignores it as a call argument.
        processor.image_processor.do_image_splitting = split
    elif split:
        raise SystemExit("S2 splits the image into tiles, which this model's processor does not do")
    return processor(text=prompt, images=[image], return_tensors="pt")


def run_pytorch(args) -> dict:
    import torch

    from vlmexport.families import family_for

    torch.set_num_threads(args.threads)
    model_type = checkpoint_config(args.model_dir)["model_type"]
    model, processor = family_for(model_type).load(str(Path(args.model_dir) / "checkpoint"))
    device = "cuda" if args.cuda else "cpu"
    model = model.to(device, {"fp32": torch.float32, "fp16": torch.float16}[args.peer_precision])
    return generate_timed(model, processor, args, device, model.dtype)


def openvino_ir(args) -> tuple[Path, dict]:
    """The IR folder of a variant (FP32 or INT8 weights) and OpenVINO's settings for it."""
    weights = "int8" if args.precision == "int8" else "fp32"
    folder = Path(args.model_dir) / f"openvino-{weights}"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: run bench/.venv-openvino/bin/python bench/openvino_export.py")
    config = {"INFERENCE_NUM_THREADS": str(args.threads)}
    if args.precision == "fp32":
        config |= {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    return folder, config


def run_openvino(args) -> dict:
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoProcessor

    folder, config = openvino_ir(args)
    model = OVModelForVisualCausalLM.from_pretrained(folder, ov_config=config)
    return generate_timed(model, AutoProcessor.from_pretrained(folder), args, "cpu", None)


def run_openvino_genai(args) -> dict:
    """VLMPipeline from the image file's pixels to tokens, timed per token by a streamer."""
    import numpy as np
    import openvino as ov
    import openvino_genai
    from PIL import Image

    folder, config = openvino_ir(args)
    pipe = openvino_genai.VLMPipeline(str(folder), "CPU", **config)
    generation = pipe.get_generation_config()
    generation.max_new_tokens = args.new_tokens
    generation.min_new_tokens = args.new_tokens
    generation.ignore_eos = True

    class Clock(openvino_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.times, self.tokens = [], []

        def write(self, token):
            ids = token if isinstance(token, list) else [token]
            self.times += [time.perf_counter()] * len(ids)
            self.tokens += ids
            return openvino_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    samples = []
    for _ in range(args.runs):
        start = time.perf_counter()
        image = ov.Tensor(np.array(Image.open(args.image).convert("RGB"))[None])
        clock = Clock()
        result = pipe.generate(PROMPT, images=[image], generation_config=generation, streamer=clock)
        first, last = clock.times[0], clock.times[-1]
        samples.append((first - start, (len(clock.times) - 1) / (last - first)))
    return summary(samples, clock.tokens, result.perf_metrics.get_num_input_tokens())


def generate_timed(model, processor, args, device: str, dtype) -> dict:
    """transformers `generate` (PyTorch's or optimum-intel's), timed per token by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    samples, tokens = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        inputs = inputs_for(processor, args.image, args.split).to(device)
        if dtype is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        clock = Clock()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                streamer=clock,
            )
        first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt
        samples.append((first - start, (args.new_tokens - 1) / (last - first)))
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    return summary(samples, tokens, inputs["input_ids"].shape[1])


def run_onnx_loop(args) -> dict:
    from transformers import AutoProcessor

    from vlmexport.export.onnx_runner import OnnxPackage

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.cuda else ["CPUExecutionProvider"]
    package = OnnxPackage(
        Path(args.model_dir) / "package", args.peer_precision, threads=args.threads, providers=providers
    )
    processor = AutoProcessor.from_pretrained(Path(args.model_dir) / "package")
    samples, tokens = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        inputs = {k: v.numpy() for k, v in inputs_for(processor, args.image, args.split).items()}
        times: list[float] = []
        result = package.greedy(
            inputs["input_ids"],
            package.family.processor_images(inputs),
            max_new_tokens=args.new_tokens,
            eos_token_ids=[],
            keep_logits=False,
            on_token=lambda _token, times=times: times.append(time.perf_counter()),
        )
        tokens = result.tokens
        samples.append((times[0] - start, (args.new_tokens - 1) / (times[-1] - times[0])))
    return summary(samples, tokens, inputs["input_ids"].shape[1])


def vlmserve_package(model_dir: str) -> Path:
    optimized = Path(model_dir) / "package-optimized"
    return optimized if optimized.is_dir() else Path(model_dir) / "package"


def run_vlmserve(args) -> dict:
    package = str(vlmserve_package(args.model_dir))
    options = ["--image", args.image, "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--warmup", "0"]
    options += ["--prompt", PROMPT, "--json", "--precision", args.precision] + ([] if args.split else ["--no-split"])
    # FP32 also times the same image again through the image-feature cache.
    options += ["--repeated-image"] if args.precision == "fp32" else []
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
        model = ["--model", package]
        if args.cuda:
            # Every graph on the CUDA provider: a configuration that names the package "bench".
            config.write(
                f'[[models]]\nname = "bench"\npath = {json.dumps(package)}\nproviders = [{{ kind = "cuda" }}]\n'
            )
            config.flush()
            model = ["--model", "bench", "--config", config.name]
        cmd = [str(REPO / "target/release/vlmserve"), "bench", *model, *options]
        report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {
        "ttft_s": report["time_to_first_token_s"]["median"],
        "decode_tok_s": report["decode_tokens_per_second"]["median"],
        "peak_rss_mb": report["peak_rss_bytes"] / 2**20,
        "tokens": report["token_ids"],
        "prompt_tokens": report["prompt_tokens"],
        "outside_runtime": report["decode_outside_runtime_share"]["median"],
        "transferred_per_step": report["decode_transferred_bytes_per_step"]["median"],
        "repeated_ttft_s": report.get("repeated_image_time_to_first_token_s", {}).get("median"),
    }


def summary(samples: list[tuple[float, float]], tokens: list[int], prompt_tokens: int) -> dict:
    return {
        "ttft_s": statistics.median(s[0] for s in samples),
        "decode_tok_s": statistics.median(s[1] for s in samples),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
    }


def read_bandwidth_gb_s(threads: int) -> float:
    """Bytes read per second by sums on every thread over arrays of 256 MiB, 512 MiB and 1 GiB
    (all far above the last-level cache), five passes each after a warm-up pass: the median
    over every pass, steadier on a shared host than a best or a single size."""
    import torch

    torch.set_num_threads(threads)
    rates = []
    for mib in (256, 512, 1024):
        a = torch.ones(mib * 2**18, dtype=torch.float32)
        a.sum()
        rates += [a.numel() * 4 / _timed(a.sum) / 1e9 for _ in range(5)]
    return statistics.median(rates)


def matmul_gflop_s(threads: int) -> float:
    """Best of five FP32 2048x2048 matrix products on every thread (PyTorch's BLAS): the rate
    that bounds compute-bound work such as the vision encoder."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def vision_gflop_per_tile(model_dir: str) -> float:
    """Floating-point operations of one tile through the vision encoder and connector, from
    the checkpoint's config (matrix products only: patch embedding, attention projections and
    scores, MLP, the connector's projection)."""
    config = checkpoint_config(model_dir)
    vision, text = config["vision_config"], config["text_config"]
    d, f, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    n = (vision["image_size"] // p) ** 2
    per_layer = 4 * n * d * d + 2 * n * d * f + 2 * n * n * d
    macs = n * 3 * p * p * d + vision["num_hidden_layers"] * per_layer + n * d * text["hidden_size"]
    return 2 * macs / 1e9


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def peer(name: str, scenario: str, args, precision: str = "fp32") -> dict:
    python = str(OPENVINO_PYTHON) if name.startswith("openvino") else sys.executable
    cmd = [python, __file__, "--peer", name, "--scenario", scenario, "--model-dir", args.model_dir]
    cmd += ["--precision", precision]
    cmd += ["--image", args.image, "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
    cmd += ["--threads", str(args.threads), "--peer-precision", args.peer_precision] + (["--cuda"] if args.cuda else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def alternating_rounds(scenario: str, args) -> dict:
    """Every peer (and vlmserve's other precisions) once per round, in its own process; the
    order reversed every other round. Returns {label: figures over the rounds}."""
    precisions = [p for p in args.precisions.split(",") if p != "fp32"]
    entrants = [(name, "fp32") for name in args.peers] + [("vlmserve", p) for p in precisions]
    for name in [n for n in args.peers if n.startswith("openvino")]:
        entrants += [(name, "bf16")] + [(name, "int8")] * ("int8" in precisions)
    rounds: dict[str, list[dict]] = {}
    for i in range(args.rounds):
        for name, precision in entrants if i % 2 == 0 else entrants[::-1]:
            label = name if precision == "fp32" else f"{name} {precision}"
            r = peer(name, scenario, args, precision)
            rounds.setdefault(label, []).append(r)
            print(
                f"{scenario} {label} (round {i + 1}): ttft {r['ttft_s']:.2f} s, decode {r['decode_tok_s']:.1f} tok/s, {r['peak_rss_mb']:.0f} MB"
                + (f", {r['transferred_per_step']:,.0f} B/step host<->device" if "transferred_per_step" in r else ""),
                flush=True,
            )
    return {label: over_rounds(rounds[label]) for label in rounds}


def over_rounds(rounds: list[dict]) -> dict:
    """Medians over one peer's rounds, its largest peak RSS; greedy tokens must not change."""
    if any(r["tokens"] != rounds[0]["tokens"] for r in rounds):
        raise SystemExit("a peer's greedy tokens changed between rounds")
    figures = dict(rounds[0], peak_rss_mb=max(r["peak_rss_mb"] for r in rounds))
    for key in ("ttft_s", "decode_tok_s", "outside_runtime", "transferred_per_step", "repeated_ttft_s"):
        if rounds[0].get(key) is not None:
            figures[key] = statistics.median(r[key] for r in rounds)
    return figures


def compute_floor_lines(results: dict, args, gflop_s: float | None) -> list[str]:
    """The CPU's floor under FP32 time to first token per scenario: its tiles' vision work at
    the measured matrix-product rate, against 0.6x the loop's time."""
    if gflop_s is None or "image_size" not in checkpoint_config(args.model_dir)["vision_config"]:
        return []  # no fixed tiles (Qwen2-VL's vision takes each image at its own size)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(Path(args.model_dir) / "package")
    tile_gflop = vision_gflop_per_tile(args.model_dir)
    lines = [
        f"FP32 matrix products at {gflop_s:.0f} GFLOP/s; one tile through the vision encoder is {tile_gflop:.0f} GFLOP."
    ]
    for scenario, peers in results.items():
        if "onnx_loop" not in peers:
            continue
        # Tiles the HF processor makes of the benchmark image in this scenario.
        tiles = int(inputs_for(processor, args.image, scenario == "S2")["pixel_values"].shape[1])
        floor = tiles * tile_gflop / gflop_s
        loop = peers["onnx_loop"]["ttft_s"]
        lines.append(
            f"{scenario} ({tiles} tile{'s' if tiles > 1 else ''}): an FP32 first token takes at least {floor:.2f} s on this CPU, "
            f"{floor / loop:.2f}x the loop's {loop:.2f} s (0.6x would be {0.6 * loop:.2f} s)."
        )
    return lines


def report(results: dict, args, bandwidth: list[float] | None, floor_lines: list[str]) -> str:
    lines = [
        "| scenario | peer | prompt tokens | time to first token (s) | decode tok/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, peers in results.items():
        for name, r in peers.items():
            lines.append(
                f"| {scenario} | {name} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    lines += [
        "",
        "| scenario | ratio (vlmserve / peer) | time to first token | decode tok/s | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for scenario, peers in results.items():
        ours = peers["vlmserve"]
        for name in [n for n in args.peers if n != "vlmserve"]:
            r = peers[name]
            lines.append(
                f"| {scenario} | / {name} | {ours['ttft_s'] / r['ttft_s']:.2f}x | {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x "
                f"| {ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x |"
            )
        for name in [n for n in peers if n.startswith("openvino") and " " in n]:
            r = peers[name]
            ours_name = "vlmserve int8" if name.endswith(" int8") else "vlmserve"
            same = sum(1 for a, b in zip(r["tokens"], ours["tokens"]) if a == b)
            lines.append(
                f"| {scenario} | {ours_name} / {name} | {peers[ours_name]['ttft_s'] / r['ttft_s']:.2f}x "
                f"| {peers[ours_name]['decode_tok_s'] / r['decode_tok_s']:.2f}x "
                f"| {peers[ours_name]['peak_rss_mb'] / r['peak_rss_mb']:.2f}x "
                f"(greedy tokens equal to vlmserve fp32's: {same}/{len(ours['tokens'])}) |"
            )
        for name in [n for n in peers if n.startswith("vlmserve ") and "pytorch" in peers]:
            r, torch = peers[name], peers["pytorch"]
            same = sum(1 for a, b in zip(r["tokens"], ours["tokens"]) if a == b)
            lines.append(
                f"| {scenario} | {name} / pytorch {args.peer_precision} | {r['ttft_s'] / torch['ttft_s']:.2f}x "
                f"| {r['decode_tok_s'] / ours['decode_tok_s']:.2f}x of vlmserve fp32 | {r['peak_rss_mb'] / torch['peak_rss_mb']:.2f}x "
                f"(greedy tokens equal to fp32's: {same}/{len(ours['tokens'])}) |"
            )
    lines += ["", ceiling_line(results, args, bandwidth), *floor_lines]
    for scenario, same in fp32_agreement(results, args.peers).items():
        lines.append(
            f"Greedy tokens in {scenario} equal to vlmserve FP32's: {', '.join(f'{k} {v}' for k, v in same.items())}"
            + "".join(
                f" ({k}'s first {agreeing_prefix(results[scenario][k]['tokens'], results[scenario]['vlmserve']['tokens'])} equal)"
                for k, v in same.items()
                if not v
            )
            + "."
        )
    for scenario, peers in results.items():
        ours = peers["vlmserve"]
        lines.append(
            f"{scenario}: the same image again (image-feature cache) reaches its first token in {ours['repeated_ttft_s']:.2f} s, "
            f"{ours['repeated_ttft_s'] / ours['ttft_s']:.2f}x the first request's; decode steps spend "
            f"{ours['outside_runtime']:.1%} of their time outside ONNX Runtime and hand "
            f"{ours['transferred_per_step']:,.0f} bytes between host and device each."
        )
    return "\n".join(lines)


def fp32_agreement(results: dict, peers: list[str]) -> dict:
    """Per scenario and peer: whether its greedy tokens equal vlmserve's FP32 ones."""
    return {
        scenario: {name: peers_of[name]["tokens"] == peers_of["vlmserve"]["tokens"] for name in peers}
        for scenario, peers_of in results.items()
    }


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def cache_bytes_per_position(model_dir: str, precision: str) -> int:
    """KV-cache bytes one cached position holds over every decoder layer (keys and values); the
    fp16 variant's cache is float16, the others' float32."""
    config = checkpoint_config(model_dir)
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    width = 2 if precision == "fp16" else 4
    return text["num_hidden_layers"] * 2 * text.get("num_key_value_heads", heads) * head_dim * width


def decoder_weight_bytes(model_dir: str, precision: str) -> int:
    """Bytes of the decoder variant vlmserve runs: its graph and, above 2 GB, its external data."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    decoder = vlmserve_package(model_dir) / f"onnx/decoder_model_merged{suffix}.onnx"
    return sum(p.stat().st_size for p in (decoder, decoder.with_name(decoder.name + ".data")) if p.exists())


def ceiling_line(results: dict, args, bandwidth: list[float] | None) -> str:
    """The CPU decode ceiling per scenario and vlmserve variant: read bandwidth (the probes
    before and after the rounds, and their mean) over the bytes a step must read, the decoder's
    weights and the KV cache at the decode's middle position (a step reads every cached key and
    value)."""
    if bandwidth is None:
        return ""
    mean = statistics.mean(bandwidth)
    precisions = args.precisions.split(",")
    weights = {p: decoder_weight_bytes(args.model_dir, p) for p in precisions}
    per_position = {p: cache_bytes_per_position(args.model_dir, p) for p in precisions}
    shares = []
    for scenario, peers in results.items():
        positions = peers["vlmserve"]["prompt_tokens"] + args.new_tokens // 2
        for precision, size in weights.items():
            cache = per_position[precision] * positions
            ours = peers["vlmserve" if precision == "fp32" else f"vlmserve {precision}"]
            ceiling = mean * 1e9 / (size + cache)
            shares.append(
                f"{scenario} {precision.upper()}: {size / 1e6:.0f} MB of weights and {cache / 1e6:.0f} MB of cache, "
                f"ceiling {ceiling:.1f} tok/s, vlmserve at {ours['decode_tok_s'] / ceiling:.0%} of it"
            )
    return (
        f"Read bandwidth {bandwidth[0]:.1f} GB/s before the rounds and {bandwidth[1]:.1f} GB/s after; "
        f"a decode step reads the decoder's weights and the cache: {'; '.join(shares)}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--image", default="bench/models/scene-512.png", help="made from the red-circle scene when missing"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="requests per peer process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per peer, alternating (see above)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--scenarios", default="S1,S2")
    parser.add_argument("--precisions", default="fp32", help="vlmserve's variants; the peers run fp32")
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # a peer process's variant
    parser.add_argument("--cuda", action="store_true", help="every peer on the GPU (see above)")
    parser.add_argument(
        "--peer-precision", default="fp32", choices=["fp32", "fp16"], help="the loop's graphs and PyTorch's dtype"
    )
    parser.add_argument(
        "--peers", default="vlmserve,onnx_loop,pytorch", help=f"which of {PEERS} run; vlmserve always does"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peers = ["vlmserve", *[p for p in args.peers.split(",") if p in PEERS and p != "vlmserve"]]
    if args.peer:
        args.split = args.scenario == "S2"
        runs = {
            "vlmserve": run_vlmserve,
            "onnx_loop": run_onnx_loop,
            "pytorch": run_pytorch,
            "openvino": run_openvino,
            "openvino_genai": run_openvino_genai,
        }
        result = runs[args.peer](args)
        print(json.dumps(result))
        return
    if not Path(args.image).exists():
        from PIL import Image

        Image.open(REPO / "tests/fixtures/scenes/red-circle.png").convert("RGB").resize((512, 512)).save(args.image)
    before = None if args.cuda else read_bandwidth_gb_s(args.threads)
    gflop_s = None if args.cuda else matmul_gflop_s(args.threads)
    results = {scenario: alternating_rounds(scenario, args) for scenario in args.scenarios.split(",")}
    bandwidth = None if args.cuda else [before, read_bandwidth_gb_s(args.threads)]
    text = report(results, args, bandwidth, compute_floor_lines(results, args, gflop_s))
    print(text)
    if args.out:
        title = "## GPU peers:" if args.cuda else "## Peers:"
        model_name = Path(args.model_dir).name
        openvino = any(p.startswith("openvino") for p in args.peers)
        default_model = model_name == Path(DEFAULT_MODEL_DIR).name
        heading = f"{title} {', '.join(args.peers)}" + ("" if default_model else f" on {model_name}")
        header = (
            f"{heading} ({datetime.date.today()}, {machine(args.cuda)})\n\n"
            f"`.venv/bin/python bench/compare.py{'' if default_model else ' --model-dir ' + args.model_dir}{' --cuda --peer-precision ' + args.peer_precision if args.cuda else ''} --peers {','.join(args.peers)} --new-tokens {args.new_tokens} --runs {args.runs} --rounds {args.rounds} --scenarios {args.scenarios} "
            f"--precisions {args.precisions}`: "
            f'{args.peer_precision.upper()} peers, the {model_name} model (random weights), a 512x512 image, "{PROMPT}", '
            f"vlmserve on {vlmserve_package(args.model_dir).name}/, the Python loop on package/, "
            f"{args.new_tokens} new tokens; {args.rounds} rounds, each running every peer once in its own process "
            f"({args.runs} requests), in reverse order every other round; medians over rounds of each process's medians."
            + (
                " OpenVINO 2026.4.1 (optimum-intel 2.2.0, OpenVINO GenAI 2026.4.1, bench/.venv-openvino) on the IR that "
                "bench/openvino_export.py makes of the checkpoint; each peer's first request includes its warm-up."
                if openvino
                else ""
            )
            + "\n\n"
        )
        # OpenVINO runs and other models get a section of their own beside the default one.
        section = f"{heading} (" if openvino or not default_model else title
        write_section(args.out, section, header + text)
    if args.peer_precision != "fp32":
        return
    # OpenVINO's kernels are its own (its FP32 may part from ours at a near tie): its tokens
    # are reported, while the peers that run our graphs or the reference must agree.
    differ = [
        f"{scenario} {name}"
        for scenario, same in fp32_agreement(results, args.peers).items()
        for name, ok in same.items()
        if not ok and not name.startswith("openvino")
    ]
    if differ:
        raise SystemExit(f"greedy FP32 tokens differ from vlmserve's: {', '.join(differ)}")


if __name__ == "__main__":
    main()
