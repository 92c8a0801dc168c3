#!/usr/bin/env python3
"""Prefix cache benchmark: follow-up turns and a shared system prompt, with and without it.

    python3 bench/prefix.py --package bench/models/smolvlm-256m-shaped/package-optimized --out docs/benchmarks.md

Starts two `target/release/vlmserve serve` on the package, side by side: "prefix" with the
default caches (prefix cache and image-feature cache) and "features" with the prefix cache off
(`scheduler.prefix_cache_mb = 0`), so the feature cache alone is the baseline. Requests go to
one then the other, the order swapped every round, each round with a picture neither server
has seen. Response cache off on both. Streaming greedy chat requests; time to first token is
from sending the request to the first content chunk (image decoding and preprocessing
included).

- Turns: turn 1 sends the picture and "Describe the image." (--max-tokens new tokens); turn 2
  re-sends the picture, the question, turn 1's answer and a follow-up question, as clients do.
  In S1 (one tile: `do_image_splitting = false`) and S2 (the processor's defaults: 17 tiles
  for a 512x512 picture), each on its own pair of servers.
- System prompt: a ~1,000-token system prompt shared by every request, then a new picture and
  a question (S1). The first round fills the cache and is left out.
- Memory: on the prefix server, the growth of `prefix_cache_bytes` over each turn 1 (all of
  its blocks new) per token kept, against the KV layout's bytes per token from config.json.

Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import random
import statistics
import struct
import subprocess
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

from docs_section import machine, write_section
from load import metric

REPO = Path(__file__).resolve().parent.parent
BLOCK_TOKENS = 32


def picture(seed: int, width: int = 512, height: int = 512) -> bytes:
    """An RGB PNG of a background and four rectangles, all coloured and placed by `seed`."""
    rng = random.Random(seed)
    pixels = [bytearray(bytes(rng.randrange(256) for _ in range(3)) * width) for _ in range(height)]
    for _ in range(4):
        colour = bytes(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(width - 64), rng.randrange(height - 64)
        x1, y1 = x0 + rng.randrange(32, width - x0), y0 + rng.randrange(32, height - y0)
        for row in pixels[y0:y1]:
            row[3 * x0 : 3 * x1] = colour * (x1 - x0)
    raw = b"".join(b"\0" + bytes(row) for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def start_server(args, workdir: Path, name: str, prefix: bool, split: bool) -> tuple[subprocess.Popen, str]:
    config = workdir / f"{name}.toml"
    config.write_text(
        f"""[[models]]
name = "bench"
path = {json.dumps(str(Path(args.package).resolve()))}
precision = "{args.precision}"
[models.processor]
do_image_splitting = {"true" if split else "false"}

[server]
host = "127.0.0.1"
port = 0
request_timeout_s = 0
expose_cache_hits = true

[scheduler]
prefix_cache_mb = {512 if prefix else 0}
"""
    )
    proc = subprocess.Popen(
        [str(args.binary), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=open(workdir / f"{name}.log", "w"),
        text=True,
        cwd=REPO,
    )
    for line in proc.stdout:
        if line.startswith("listening on "):
            base = line.split()[-1].strip()
            while True:
                try:
                    if urllib.request.urlopen(f"{base}/ready", timeout=5).status == 200:
                        return proc, base
                except Exception:
                    time.sleep(0.5)
    raise SystemExit(f"server {name} did not start; see {workdir / name}.log")


def user(image: bytes, text: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def chat(base: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming greedy request: time to first token, the answer and the usage."""
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first, text, usage = None, [], None
    with urllib.request.urlopen(request, timeout=900) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"request failed: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
    return {"ttft": (first or time.perf_counter()) - start, "text": "".join(text), "usage": usage}


def bytes_per_token(package: str) -> int:
    """Keys and values of one token in every layer, FP32 (the KV layout of the fp32 package)."""
    config = json.loads((Path(package) / "config.json").read_text())
    text = config.get("text_config", config)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * 4


def turns(args, scenario: str, workdir: Path, seeds: iter) -> dict:
    servers = {
        name: start_server(args, workdir, f"{scenario}-{name}", name == "prefix", scenario == "S2")
        for name in ("prefix", "features")
    }
    rows = {name: [] for name in servers}
    kept = []
    try:
        for round_ in range(args.rounds):
            image = picture(next(seeds))
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for name in order:
                base = servers[name][1]
                before = metric(base, "vlmserve_prefix_cache_bytes")
                question = user(image, "Describe the image.")
                one = chat(base, [question], args.max_tokens)
                if name == "prefix":
                    usage = one["usage"]
                    tokens = (usage["prompt_tokens"] + usage["completion_tokens"] - 1) // BLOCK_TOKENS * BLOCK_TOKENS
                    kept.append((metric(base, "vlmserve_prefix_cache_bytes") - before) / tokens)
                history = [question, {"role": "assistant", "content": one["text"]}]
                two = chat(base, [*history, {"role": "user", "content": "What colours are in it?"}], args.max_tokens)
                row = {
                    "turn1": one["ttft"],
                    "turn2": two["ttft"],
                    "prompt1": one["usage"]["prompt_tokens"],
                    "prompt2": two["usage"]["prompt_tokens"],
                    "cached2": two["usage"]["prompt_tokens_details"]["cached_tokens"],
                }
                print(json.dumps({"scenario": scenario, "server": name, "round": round_} | row), flush=True)
                rows[name].append(row)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return {"rows": rows, "kept": kept}


def system_prompt(args, workdir: Path, seeds: iter) -> dict:
    rules = [f"Rule {i}: name every colour and shape you see, and say where each one is." for i in range(1, 26)]
    system = {"role": "system", "content": "You describe pictures. " + " ".join(rules)}
    servers = {
        name: start_server(args, workdir, f"system-{name}", name == "prefix", False) for name in ("prefix", "features")
    }
    rows = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds + 1):
            image = picture(next(seeds))
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for name in order:
                base = servers[name][1]
                prefill = metric(base, "vlmserve_stage_duration_seconds_sum", 'stage="prefill"')
                answer = chat(base, [system, user(image, "What is in the image?")], 1)
                prefill = metric(base, "vlmserve_stage_duration_seconds_sum", 'stage="prefill"') - prefill
                row = {
                    "ttft": answer["ttft"],
                    "prefill": prefill,
                    "prompt": answer["usage"]["prompt_tokens"],
                    "cached": answer["usage"]["prompt_tokens_details"]["cached_tokens"],
                }
                print(json.dumps({"scenario": "system", "server": name, "round": round_} | row), flush=True)
                if round_ > 0:
                    rows[name].append(row)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return rows


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(args, results: dict, system: dict, layout: int) -> str:
    lines = [
        "| scenario | server | prompt tokens, turn 1 / 2 | cached tokens, turn 2 | TTFT turn 1 | TTFT turn 2 | turn 2 / turn 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, result in results.items():
        for name, rows in result["rows"].items():
            t1, t2 = median(rows, "turn1"), median(rows, "turn2")
            lines.append(
                f"| {scenario} | {name} | {median(rows, 'prompt1'):.0f} / {median(rows, 'prompt2'):.0f} "
                f"| {median(rows, 'cached2'):.0f} | {t1:.3f} s | {t2:.3f} s | {t2 / t1:.3f}x |"
            )
    lines += [
        "",
        "| system prompt (S1) | prompt tokens | cached tokens | TTFT | prefill time (server) |",
        "|---|---|---|---|---|",
    ]
    for name, rows in system.items():
        lines.append(
            f"| {name} | {median(rows, 'prompt'):.0f} | {median(rows, 'cached'):.0f} | {median(rows, 'ttft'):.3f} s "
            f"| {median(rows, 'prefill'):.3f} s |"
        )
    saved = median(system["features"], "ttft") - median(system["prefix"], "ttft")
    prefill_saved = median(system["features"], "prefill") - median(system["prefix"], "prefill")
    kept = [k for result in results.values() for k in result["kept"]]
    lines += [
        "",
        f"System prompt: time to first token lower by {saved:.3f} s with the prefix cache; the prefill it "
        f"skips took {prefill_saved:.3f} s on the server.",
        "",
        f"Memory: `prefix_cache_bytes` grew by {min(kept):.0f} to {max(kept):.0f} bytes per kept token over "
        f"{len(kept)} first turns; the KV layout holds {layout} bytes per token (layers x 2 x KV heads x "
        "head size x 4 bytes).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="bench/models/smolvlm-256m-shaped/package-optimized")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--scenarios", default="S1,S2")
    parser.add_argument("--out", type=Path, help="markdown file to write the tables into")
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/vlmserve", help="the build to serve")
    args = parser.parse_args()

    seeds = iter(range(1_000_000))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {scenario: turns(args, scenario, workdir, seeds) for scenario in args.scenarios.split(",")}
        system = system_prompt(args, workdir, seeds)
    text = report(args, results, system, bytes_per_token(args.package))
    print(text)
    if args.out:
        title = "## Prefix cache: follow-up turns and a shared system prompt"
        header = (
            f"{title} ({datetime.date.today()}, {machine()})\n\n"
            f"`python3 bench/prefix.py --package {args.package} --precision {args.precision} --rounds {args.rounds} "
            f"--max-tokens {args.max_tokens} --scenarios {args.scenarios}`: two servers side by side, "
            '"prefix" with the default caches and "features" with the prefix cache off (the image-feature '
            "cache alone), requests alternated between them, a new picture every round, medians over rounds. "
            "Time to first token is the client's, from sending the request to the first content chunk: "
            "the re-sent picture's decoding and preprocessing are in it.\n\n"
        )
        write_section(args.out, title, header + text)


if __name__ == "__main__":
    main()
