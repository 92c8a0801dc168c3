#!/usr/bin/env python3
"""Load benchmark: vlmserve under 1, 4, 8, 16 concurrent streaming clients.

    python3 bench/load.py --package bench/models/smolvlm-256m-shaped/package-optimized --out docs/benchmarks.md

Starts `target/release/vlmserve serve` on the package (one tile per image: splitting off),
then, per level, runs N clients that each send --requests streaming chat requests back to
back (the image and "Describe the image.", --max-tokens new tokens, eos ignored). Reports per
level: requests/s, request latency p50/p99, time to first token p50/p99, inter-token latency
p50/p99 (gaps between streamed chunks), end-to-end tokens/s, and decode tokens/s (tokens
generated over the time the server spent in decode steps, from its /metrics), with ratios
against one client measured in the same run. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from docs_section import machine, write_section

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, str]:
    config = workdir / "load.toml"
    vision_threads = (
        f'[models.graphs.vision_encoder]\nproviders = [{{ kind = "cpu", threads = {args.vision_threads} }}]\n'
        if args.vision_threads
        else ""
    )
    config.write_text(
        f"""[[models]]
name = "bench"
path = {json.dumps(str(Path(args.package).resolve()))}
precision = "{args.precision}"
providers = [{{ kind = "{"cuda" if args.cuda else "cpu"}" }}]
[models.processor]
do_image_splitting = false
{vision_threads}
[server]
host = "127.0.0.1"
port = 0
request_timeout_s = 0

[scheduler]
max_batch_size = {args.max_batch_size}
{f"prefill_chunk_tokens = {args.prefill_chunk}" if args.prefill_chunk else ""}
queue_size = 256
image_feature_cache_mb = 0
"""
    )
    return launch(args.binary, config, workdir)


def launch(binary: str, config: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`vlmserve serve --config CONFIG`, logging to WORKDIR/server.log; its base URL once bound."""
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "server.log", "w"),
        text=True,
        cwd=REPO,
    )
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[-1].strip()
    raise SystemExit(f"server did not start; see {workdir / 'server.log'}")


def metric(base: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ " and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_request(base: str, body: bytes) -> dict:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    chunks, tokens = [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                chunks.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(chunks, chunks[1:])]
    ttft = chunks[0] - start if chunks else end - start
    return {"latency": end - start, "ttft": ttft, "gaps": gaps, "tokens": tokens, "chunks": chunks}


def steady_window(first_round: list[dict]) -> tuple[float, float] | None:
    """While every first-round request is decoding: from the last one's first token to the
    first one's last token (no vision encoding or prefill runs then, since no request has
    finished and let its client send the next). None when there is no such time."""
    if not first_round or any(len(r["chunks"]) < 2 for r in first_round):
        return None
    start = max(r["chunks"][0] for r in first_round)
    end = min(r["chunks"][-1] for r in first_round)
    return (start, end) if end > start else None


def steady_decode(first_round: list[dict]) -> tuple[float, list[float]]:
    """Tokens per second over all streams in the steady window, and the gaps between chunks
    inside it."""
    window = steady_window(first_round)
    if window is None:
        return float("nan"), []
    start, end = window
    count = sum(1 for r in first_round for t in r["chunks"] if start < t <= end)
    gaps = [b - a for r in first_round for a, b in zip(r["chunks"], r["chunks"][1:]) if start <= a and b <= end]
    return count / (end - start), gaps


def run_level(base: str, body: bytes, clients: int, requests: int) -> dict:
    results: list[dict] = []
    first_round: list[dict] = []
    lock = threading.Lock()

    def client():
        for i in range(requests):
            r = one_request(base, body)
            with lock:
                results.append(r)
                if i == 0:
                    first_round.append(r)

    tokens0 = metric(base, "vlmserve_generation_tokens_total")
    decode0 = metric(base, "vlmserve_batch_step_duration_seconds_sum", 'phase="decode"')
    batch0 = (metric(base, "vlmserve_batch_size_sum"), metric(base, "vlmserve_batch_size_count"))
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = metric(base, "vlmserve_generation_tokens_total") - tokens0
    decode_s = metric(base, "vlmserve_batch_step_duration_seconds_sum", 'phase="decode"') - decode0
    batch = (metric(base, "vlmserve_batch_size_sum") - batch0[0]) / max(
        1, metric(base, "vlmserve_batch_size_count") - batch0[1]
    )
    decode_rate = tokens / decode_s if decode_s else float("nan")
    return level_row(clients, results, first_round, wall, tokens, decode_rate, batch)


def level_row(
    clients: int,
    results: list[dict],
    first_round: list[dict],
    wall: float,
    tokens: int,
    decode_rate: float,
    batch: float,
) -> dict:
    """One level's figures from its requests' records (latency, ttft, gaps, chunks)."""
    gaps = [g for r in results for g in r["gaps"]]
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results]
    steady_rate, steady_gaps = steady_decode(first_round)
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": decode_rate,
        "steady_decode_tokens_per_s": steady_rate,
        "steady_itl_p99_s": percentile(steady_gaps, 99),
        "mean_batch": batch,
    }


def table(rows: list[dict]) -> str:
    single = rows[0]
    out = [
        "| clients | req/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | tok/s end to end "
        "| all streams decoding: tok/s | vs 1 | ITL p99 (ms) | vs 1 | tok/s over decode-step time | ITL p99 vs 1 "
        "| mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if math.isnan(r["steady_decode_tokens_per_s"]):
            # The first stream ended before the last one's first token: never all decoding at once.
            steady = "never all at once | | | "
        else:
            steady = (
                f"{r['steady_decode_tokens_per_s']:.1f} "
                f"| {r['steady_decode_tokens_per_s'] / single['steady_decode_tokens_per_s']:.2f}x "
                f"| {r['steady_itl_p99_s'] * 1e3:.0f} | {r['steady_itl_p99_s'] / single['steady_itl_p99_s']:.2f}x "
            )
        clients = f"{r['clients']} + schema" if r.get("schema") else r["clients"]
        out.append(
            f"| {clients} | {r['requests_per_s']:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} "
            f"| {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['itl_p50_s'] * 1e3:.0f} / {r['itl_p99_s'] * 1e3:.0f} "
            f"| {r['tokens_per_s']:.1f} | {steady}"
            f"| {r['decode_tokens_per_s']:.1f} | {r['itl_p99_s'] / single['itl_p99_s']:.2f}x "
            f"| {r['mean_batch']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="bench/models/smolvlm-256m-shaped/package-optimized")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--image", default="tests/fixtures/scenes/red-circle.png")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, help="scheduler.prefill_chunk_tokens (default: the server's)")
    parser.add_argument("--cuda", action="store_true", help="run every graph on the CUDA provider")
    parser.add_argument("--vision-threads", type=int, help="intra-op threads of the vision encoder")
    parser.add_argument("--out", type=Path, help="markdown file to write the table into")
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/vlmserve", help="the build to serve")
    parser.add_argument(
        "--schema",
        type=Path,
        help="a JSON schema file: every level runs twice, without and with it as response_format, in turn",
    )
    args = parser.parse_args()

    image = base64.b64encode((REPO / args.image).read_bytes()).decode()
    request = {
        "model": "bench",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    bodies = [(False, json.dumps(request).encode())]
    if args.schema:
        schema = json.loads(args.schema.read_text())
        response_format = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
        bodies.append((True, json.dumps(request | {"response_format": response_format}).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args, Path(tmp))
        try:
            while True:
                try:
                    if urllib.request.urlopen(f"{base}/ready", timeout=5).status == 200:
                        break
                except Exception:
                    time.sleep(0.5)
            rows = []
            for level, clients in enumerate(int(c) for c in args.clients.split(",")):
                # With a schema, the two variants of a level run in turn, first one then the other.
                for schema, body in bodies if level % 2 == 0 else bodies[::-1]:
                    row = run_level(base, body, clients, args.requests) | {"schema": schema}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            rows.sort(key=lambda r: (r["clients"], r["schema"]))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    text = table(rows)
    print(text)
    if args.out:
        title = f"## {'GPU load' if args.cuda else 'Load'}{', with and without a JSON schema' if args.schema else ''}:"
        header = (
            f"{title} concurrent streams ({datetime.date.today()}, {machine(args.cuda)})\n\n"
            f"`python3 bench/load.py --package {args.package} --precision {args.precision} --clients {args.clients} "
            f"--requests {args.requests} --max-tokens {args.max_tokens}"
            + (f" --vision-threads {args.vision_threads}" if args.vision_threads else "")
            + (f" --prefill-chunk {args.prefill_chunk}" if args.prefill_chunk else "")
            + (" --cuda" if args.cuda else "")
            + (f" --schema {args.schema}" if args.schema else "")
            + "`: each client sends its requests back to back, "
            f'one {args.image} image (one tile), "Describe the image.", {args.max_tokens} new tokens, eos ignored. '
            '"All streams decoding" is the aggregate rate while every client\'s first request is '
            "decoding (from the last first token to the first last token: no image encoding or prefill "
            'runs then), its ITL p99 over the gaps inside that window; "over decode-step time" divides all tokens by the server\'s time in decode steps '
            "(/metrics), which the vision encoder running beside them slows where cores are few. ITL is "
            "the gap between streamed chunks (one per token here), so it includes any pause that other "
            "requests' vision encoding and prefill cause.\n\n"
        )
        write_section(args.out, title, header + text)


if __name__ == "__main__":
    main()
