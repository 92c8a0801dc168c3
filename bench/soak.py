"""Soak: many clients for minutes against `vlmserve serve` on the default model, mixing valid
image requests, streams, clients that leave mid-stream, oversized and malformed requests and
the adversarial inputs of issue 24. Prints the status histogram per kind, latency of the valid
requests, and the server's RSS every 10 s; fails if any request got a 5xx, any oversized or
malformed request was accepted, or RSS grew more than 5% after the first minute.

    .venv/bin/python bench/soak.py --clients 64 --minutes 10
"""

import argparse
import base64
import collections
import http.client
import json
import random
import statistics
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "shapes-vlm" / "package"
CIRCLE = ROOT / "tests" / "fixtures" / "scenes" / "red-circle.png"


def png(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """An all-zero PNG (8-bit RGB by default; depth 16, colour 6 for RGBA16)."""
    channels = {2: 3, 6: 4}[colour]
    row = b"\0" + bytes(width * channels * depth // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def chat(image: bytes | None, question: str = "What color is the circle?", **extra) -> bytes:
    content = [{"type": "text", "text": question}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    return json.dumps(body).encode()


CIRCLE_BYTES = CIRCLE.read_bytes()
HUGE_DECODE = png(8192, 4096, depth=16, colour=6)
OVER_SIDE = png(9000, 16)
# Every kind: (body or callable, is the request within the limits, stream, leave early).
KINDS = {
    "valid": (lambda: chat(CIRCLE_BYTES), True),
    "stream": (lambda: chat(CIRCLE_BYTES, stream=True, max_tokens=32), True),
    "leave_mid_stream": (lambda: chat(CIRCLE_BYTES, stream=True, max_tokens=200, ignore_eos=True), True),
    "text": (lambda: chat(None, "Describe a red circle."), True),
    "decode_heavy": (lambda: chat(HUGE_DECODE), True),
    "malformed_json": (lambda: b'{"messages": [', False),
    "too_many_pixels": (lambda: chat(OVER_SIDE), False),
    "long_stop": (lambda: chat(CIRCLE_BYTES, stop=["x" * 4096]), False),
    "huge_max_tokens": (lambda: chat(CIRCLE_BYTES, max_tokens=2**63), False),
    "huge_prompt": (lambda: chat(None, "word " * 400_000), False),
    "not_json": (lambda: b"messages=hi", False),
}
WEIGHTS = {"valid": 30, "stream": 15, "leave_mid_stream": 8, "text": 10, "decode_heavy": 2, "malformed_json": 7}
WEIGHTS |= {"too_many_pixels": 5, "long_stop": 5, "huge_max_tokens": 5, "huge_prompt": 3, "not_json": 10}


def one(host: str, port: int, kind: str) -> tuple[int, float]:
    make, _ = KINDS[kind]
    body = make()
    content_type = "text/plain" if kind == "not_json" else "application/json"
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        if kind == "leave_mid_stream" and response.status == 200:
            response.readline()
            response.readline()
            return response.status, time.monotonic() - start
        response.read()
        return response.status, time.monotonic() - start
    except (ConnectionError, http.client.HTTPException, TimeoutError) as e:
        return -1 if not isinstance(e, TimeoutError) else -2, time.monotonic() - start
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(f'[[models]]\nname = "shapes-vlm"\npath = {json.dumps(str(PACKAGE))}\n')
        binary = ROOT / "target" / "release" / "vlmserve"
        proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        base = proc.stdout.readline().split(" ", 2)[2].strip()
        host, port = base.removeprefix("http://").rsplit(":", 1)
        while True:
            try:
                if urllib.request.urlopen(base + "/ready", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        end = time.monotonic() + args.minutes * 60
        results = collections.defaultdict(list)
        lock = threading.Lock()
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())

        def client(index: int):
            rng = random.Random(args.seed + index)
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                status, seconds = one(host, int(port), kind)
                with lock:
                    results[kind].append((status, seconds))

        rss = []
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - started, rss_mb(proc.pid)))
            time.sleep(10)
        for thread in threads:
            thread.join()
        alive = proc.poll() is None
        proc.terminate()
        proc.wait()

    print(f"## Soak: {args.clients} clients, {args.minutes:g} minutes, shapes-vlm FP32, default configuration")
    failures = []
    print("| kind | requests | statuses |\n|---|---|---|")
    for kind, done in sorted(results.items()):
        statuses = collections.Counter(s for s, _ in done)
        print(f"| {kind} | {len(done)} | {dict(sorted(statuses.items()))} |")
        if kind != "leave_mid_stream" and any(s >= 500 or s < 0 for s in statuses):
            failures.append(f"{kind}: a 5xx, a reset or a timeout")
        if not KINDS[kind][1] and statuses.get(200):
            failures.append(f"{kind}: accepted over a limit")
    valid = sorted(t for kind in ("valid", "text") for s, t in results[kind] if s == 200)
    if valid:
        p50, p99 = statistics.median(valid), valid[min(len(valid) - 1, int(len(valid) * 0.99))]
        print(f"\nvalid requests answered 200: {len(valid)}, latency p50 {p50:.2f} s, p99 {p99:.2f} s")
    print("\nRSS (MB) every 10 s: " + ", ".join(f"{mb:.0f}" for _, mb in rss))
    after_minute = [mb for t, mb in rss if t >= 60]
    if len(after_minute) >= 2:
        growth = after_minute[-1] / after_minute[0] - 1
        print(f"RSS growth after the first minute: {growth * 100:+.1f}%")
        if growth > 0.05:
            failures.append(f"RSS grew {growth * 100:.1f}% after the first minute")
    if not alive:
        failures.append("the server died")
    print("\n" + ("FAILED: " + "; ".join(failures) if failures else "passed: no 5xx, no limit crossed, RSS flat"))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
