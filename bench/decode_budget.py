"""Peak server memory under images that are small to send and large to decode.

Sends N requests at once, each with a PNG of a few hundred KB declaring 8192x4096 16-bit RGBA
(exactly the default max_image_pixels), to a server with the default image decode budget and
to one whose budget is out of reach, and prints each server's peak RSS (VmHWM) and statuses.

    .venv/bin/python bench/decode_budget.py --clients 16
"""

import argparse
import base64
import collections
import concurrent.futures
import json
import struct
import subprocess
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tests" / "fixtures" / "idefics3-tiny" / "package"


def png_rgba16(width: int, height: int) -> bytes:
    """An all-zero 16-bit RGBA PNG: tiny compressed, width x height x 8 bytes decoded."""
    row = b"\0" + bytes(width * 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def run(budget_mb: int, clients: int, body: bytes) -> tuple[float, collections.Counter]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[[models]]\nname = "m"\npath = {json.dumps(str(PACKAGE))}\n'
            f"[server]\nimage_decode_budget_mb = {budget_mb}\nimage_decode_wait_s = 120\n"
            f"[scheduler]\nqueue_size = {clients}\n"
        )
        binary = ROOT / "target" / "release" / "vlmserve"
        proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--config", str(config)], stdout=subprocess.PIPE, text=True
        )
        base = proc.stdout.readline().split(" ", 2)[2].strip()
        while True:
            try:
                if urllib.request.urlopen(base + "/ready", timeout=5).status == 200:
                    break
            except OSError:
                pass

        def ask(_):
            request = urllib.request.Request(
                base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            statuses = collections.Counter(pool.map(ask, range(clients)))
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        proc.terminate()
        proc.wait()
        return peak_kb / 1024 / 1024, statuses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    image = png_rgba16(8192, 4096)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1}).encode()
    print(f"{args.clients} requests at once, each a {len(image) // 1024} KB PNG of 8192x4096 16-bit RGBA")
    for budget_mb in (1024, 1 << 20):
        peak_gb, statuses = run(budget_mb, args.clients, body)
        print(f"image_decode_budget_mb = {budget_mb}: peak RSS {peak_gb:.2f} GB, statuses {dict(statuses)}")


if __name__ == "__main__":
    main()
