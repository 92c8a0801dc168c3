#!/usr/bin/env python
"""Build the benchmark model: SmolVLM-256M-Instruct's exact architecture with seeded random
weights and its real image-processor settings, saved with save_pretrained and exported.

    .venv/bin/python export/bench_model.py --out bench/models/smolvlm-256m-shaped

Real weights cannot be downloaded here; speed and memory depend on the shapes only, which are
those of ../shared/reference/ANCHORS.md: SigLIP base patch16-512 (12 layers, hidden 768),
pixel shuffle 4 (64 tokens per 512x512 tile), SmolLM2-135M (30 layers, hidden 576, 9 heads,
3 KV heads, vocabulary 49280, tied embeddings), and the processor's longest edge 2048 with
512 tiles and splitting on (a 512x512 image becomes 17 tiles). The tokenizer is the tiny test
one, padded with plain added tokens up to the vocabulary so that every id the random model
picks decodes to text (streamed, as a real model's tokens are).
Two packages: package/ as export.py writes it with default flags (what a user's own
onnxruntime loop runs) and package-optimized/ with --optimize (ONNX Runtime's fusions on the
fp32 graphs, parity-checked: vlmserve at its best).
Output goes to an ignored folder: about 1 GB per precision and package, never committed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_idefics3 as tiny  # noqa: E402

VOCAB_SIZE = 49280
TEXT_SIZES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)
ROPE_THETA = 100000.0
VISION_SIZES = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=512,
    patch_size=16,
)
SCALE_FACTOR = 4
IMAGE_SEQ_LEN = 64  # (512 / 16)^2 / 4^2


def padded_tokenizer():
    tokenizer = tiny.build_tokenizer()
    tokenizer.add_tokens([f" w{i}" for i in range(len(tokenizer), VOCAB_SIZE)])
    assert len(tokenizer) == VOCAB_SIZE
    return tokenizer


def build(seed: int):
    tokenizer = padded_tokenizer()
    image_processor = tiny.build_image_processor(
        do_image_splitting=True, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}
    )
    processor = tiny.build_processor(tokenizer, image_processor, IMAGE_SEQ_LEN)
    config = tiny.build_config(tokenizer, TEXT_SIZES, VISION_SIZES, SCALE_FACTOR)
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_THETA}
    config.text_config.tie_word_embeddings = True
    config.tie_word_embeddings = True
    # transformers' own initialisation (std 0.02), as a freshly built checkpoint has.
    model = tiny.build_model(tokenizer, seed=seed, std=None, config=config)
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes checkpoint/ and package/")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-only", action="store_true", help="rewrite the tokenizer files of an existing OUT")
    parser.add_argument(
        "--packages", default="package,package-optimized", help="which of the two packages to (re)write"
    )
    args = parser.parse_args()
    if args.tokenizer_only:
        for folder in ("checkpoint", *args.packages.split(",")):
            padded_tokenizer().save_pretrained(args.out / folder)
        return
    model, processor = build(args.seed)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.1f}M parameters", flush=True)
    checkpoint = args.out / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    script = Path(__file__).resolve().parent / "export.py"
    for package in args.packages.split(","):
        flags = {"package": [], "package-optimized": ["--optimize"]}[package]
        cmd = [sys.executable, str(script), "--model", str(checkpoint), "--out", str(args.out / package)]
        subprocess.run(cmd + ["--precisions", args.precisions, *flags], check=True)


if __name__ == "__main__":
    main()
