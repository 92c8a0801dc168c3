#!/usr/bin/env python3
"""OpenVINO GenAI's continuous batching under the load that bench/load.py puts on vlmserve.

    bench/.venv-openvino/bin/python bench/load_openvino.py --model-dir bench/models/qwen2-vl-2b-shaped

The peer a server built on OpenVINO runs (OpenVINO Model Server's VLM servable drives the same
class): a `ContinuousBatchingPipeline` on the IR that bench/openvino_export.py writes, fed with
`add_request` (prompt and image) and advanced by `step()`, every request's tokens read from its
handle after each step. Per level, N clients each send --requests requests back to back, the
same image and "Describe the image.", --max-tokens new tokens, eos ignored, as load.py does;
the figures and the table are load.py's (time to first token, gaps between tokens, the
aggregate rate while every client's first request is decoding), except "over decode-step
time", which has no counterpart here. FP32 runs with INFERENCE_PRECISION_HINT f32 (and an f32
KV cache), as in bench/compare.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
from compare import PROMPT, openvino_ir
from docs_section import machine, write_section
from load import level_row, table
from PIL import Image


def pipeline(args) -> openvino_genai.ContinuousBatchingPipeline:
    folder, properties = openvino_ir(args)
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = args.cache_gb
    scheduler.max_num_seqs = args.max_batch_size
    return openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties, {}, properties)


def run_level(pipe, image: ov.Tensor, config, clients: int, requests: int) -> dict:
    """Closed loop: a client's next request is added in the step after its last one ends."""
    sent = [0] * clients
    live: dict[int, tuple[int, object, dict]] = {}  # request id -> (client, handle, record)
    results, first_round, batch_sizes = [], [], []
    next_id = 0

    def send(client: int) -> None:
        nonlocal next_id
        record = {"start": time.perf_counter(), "chunks": [], "tokens": 0}
        live[next_id] = (client, pipe.add_request(next_id, PROMPT, [image], config), record)
        if sent[client] == 0:
            first_round.append(record)
        sent[client] += 1
        next_id += 1

    start = time.perf_counter()
    for client in range(clients):
        send(client)
    while live:
        pipe.step()
        now = time.perf_counter()
        batch_sizes.append(pipe.get_metrics().scheduled_requests)
        for request_id, (client, handle, record) in list(live.items()):
            while handle.can_read():
                new = sum(len(output.generated_ids) for output in handle.read().values())
                record["chunks"] += [now] * new
            if handle.get_status() != openvino_genai.GenerationStatus.RUNNING:
                end = time.perf_counter()
                chunks = record["chunks"]
                record |= {
                    "latency": end - record["start"],
                    "ttft": chunks[0] - record["start"] if chunks else end - record["start"],
                    "gaps": [b - a for a, b in zip(chunks, chunks[1:])],
                    "tokens": len(chunks),
                }
                results.append(record)
                del live[request_id]
                if sent[client] < requests:
                    send(client)
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    # No decode-step time to divide by: that column stays empty.
    return level_row(clients, results, first_round, wall, tokens, float("nan"), float(np.mean(batch_sizes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="bench/models/qwen2-vl-2b-shaped")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--image", default="tests/fixtures/scenes/red-circle.png")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--cache-gb", type=int, default=4, help="the scheduler's KV cache size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="markdown file to write the table into")
    args = parser.parse_args()

    pipe = pipeline(args)
    image = ov.Tensor(np.array(Image.open(args.image).convert("RGB"))[None])
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = args.max_tokens
    config.ignore_eos = True
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        row = run_level(pipe, image, config, clients, args.requests)
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = table(rows)
    print(text)
    if args.out:
        title = f"## Load, OpenVINO GenAI {args.precision}: concurrent streams on {Path(args.model_dir).name}"
        header = (
            f"{title} ({datetime.date.today()}, {machine(False)})\n\n"
            f"`bench/.venv-openvino/bin/python bench/load_openvino.py --model-dir {args.model_dir} --precision {args.precision} "
            f"--clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}`: OpenVINO GenAI "
            f"{openvino_genai.get_version()}'s ContinuousBatchingPipeline (at most {args.max_batch_size} sequences, "
            f"{args.cache_gb} GB of KV cache), each client sending its requests back to back, one {args.image} image, "
            f'"{PROMPT}", {args.max_tokens} new tokens, eos ignored; columns as in load.py\'s table '
            "(no decode-step time: the last column but one is empty).\n\n"
        )
        write_section(args.out, title, header + text)


if __name__ == "__main__":
    main()
