#!/usr/bin/env python3
"""Shadow traffic's cost to clients: one client's latency with a shadow version on and off.

    python3 bench/shadow.py --out docs/benchmarks.md

Starts `target/release/vlmserve serve` with two versions of one model on the same package: a
stable version answering every request, and a candidate that shadows them. Rounds alternate
the candidate's shadow share between 0 and 100 percent (PUT /admin/models/{name}/shadow), and
one client sends streaming requests back to back (an image and a question, --max-tokens new
tokens, eos ignored). Reports time to first token and request latency medians for each
setting, with the shadow-on / shadow-off ratios, and how many shadow copies ran and agreed.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from docs_section import machine, write_section
from load import launch, metric, one_request

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, str]:
    package = json.dumps(str(Path(args.package).resolve()))
    config = workdir / "shadow.toml"
    config.write_text(
        f"""[[models]]
name = "bench"
version = "stable"
path = {package}

[[models]]
name = "bench"
version = "candidate"
weight = 0
shadow = 100
path = {package}

[server]
port = 0
admin_token = "{TOKEN}"

[scheduler]
image_feature_cache_mb = 0
prefix_cache_mb = 0
"""
    )
    proc, base = launch(args.binary, config, workdir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{base}/ready", timeout=5).status == 200:
                return proc, base
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server not ready")


def package_name(package: str) -> str:
    path = Path(package).resolve()
    return f"{path.parent.name}/{path.name}"


def set_shadow(base: str, percent: int) -> None:
    request = urllib.request.Request(
        f"{base}/admin/models/bench/shadow",
        data=json.dumps({"candidate": percent}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method="PUT",
    )
    urllib.request.urlopen(request, timeout=30).read()


def wait_idle(base: str) -> None:
    """Until the shadow's copies of the previous round are done."""
    while metric(base, "vlmserve_num_requests_running") + metric(base, "vlmserve_num_requests_waiting") > 0:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default=str(REPO / "models/shapes-vlm/package"))
    parser.add_argument("--binary", default=str(REPO / "target/release/vlmserve"))
    parser.add_argument("--image", default=str(REPO / "tests/fixtures/scenes/red-circle.png"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="of each setting, alternated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    image = base64.b64encode(Path(args.image).read_bytes()).decode()
    body = json.dumps(
        {
            "model": "bench",
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "ignore_eos": True,
            "max_tokens": args.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                        {"type": "text", "text": "Describe the image."},
                    ],
                }
            ],
        }
    ).encode()
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args, Path(tmp))
        try:
            samples = {0: [], 100: []}
            for _ in range(2):  # warm both versions
                one_request(base, body)
            for _ in range(args.rounds):
                for percent in (0, 100):
                    set_shadow(base, percent)
                    wait_idle(base)
                    samples[percent] += [one_request(base, body) for _ in range(args.requests)]
            wait_idle(base)
            shadow = {
                result: metric(base, "vlmserve_shadow_requests_total", f'result="{result}"')
                for result in ("agreed", "disagreed", "uncompared", "failed", "dropped")
            }
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def median(percent: int, key: str) -> float:
        return statistics.median(s[key] for s in samples[percent])

    rows = []
    for key, label in (("ttft", "time to first token"), ("latency", "request latency")):
        off, on = median(0, key), median(100, key)
        rows.append(f"| {label} | {off * 1000:.1f} ms | {on * 1000:.1f} ms | {on / off:.3f} |")
    text = "\n".join(
        [
            f"## Shadow traffic: one client's latency with a shadow on and off ({machine()})",
            "",
            f"`python3 bench/shadow.py`, {datetime.date.today()}: {package_name(args.package)} twice (stable answers, "
            f"candidate shadows), 1 streaming client, {args.max_tokens} new tokens, {args.rounds} alternated rounds "
            f"of {args.requests} requests per setting; medians.",
            "",
            "| | shadow 0% | shadow 100% | ratio |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            "Shadow copies: " + ", ".join(f"{int(v)} {k}" for k, v in shadow.items()) + ".",
        ]
    )
    print(text)
    if args.out:
        write_section(args.out, "## Shadow traffic", text)


if __name__ == "__main__":
    main()
