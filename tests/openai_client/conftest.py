"""A real `vlmserve serve` on a loopback port, for the official client's tests."""

import base64
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _binary() -> Path:
    path = Path(os.environ.get("VLMSERVE_BIN", ROOT / "target" / "release" / "vlmserve"))
    if not path.is_file():
        pytest.skip(f"{path} not built (cargo build --release)")
    return path


@contextlib.contextmanager
def serve(models: dict[str, Path]):
    """A server of `models` (name -> package folder); yields its base URL, ready."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        entries = "".join(
            f'[[models]]\nname = "{name}"\npath = {json.dumps(str(path))}\n' for name, path in models.items()
        )
        config.write_text(entries + "[server]\nhttp_workers = 2\n")
        proc = subprocess.Popen(
            [str(_binary()), "serve", "--host", "127.0.0.1", "--port", "0", "--config", str(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith("listening on "), line
            base = line.split(" ", 2)[2].strip()
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.05)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


DEFAULT = "shapes-vlm"
FAMILIES = ["idefics3-tiny", "qwen2-vl-tiny", "qwen2.5-vl-tiny"]
CIRCLE = ROOT / "tests" / "fixtures" / "scenes" / "red-circle.png"


@pytest.fixture(scope="module")
def every_model():
    """The official client of a server of the default model and every fixture family."""
    import openai

    models = {DEFAULT: ROOT / "models" / DEFAULT / "package"}
    models |= {name: ROOT / "tests" / "fixtures" / name / "package" for name in FAMILIES}
    with serve(models) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def circle_messages(question: str):
    """One user message: the red circle picture and `question`."""
    data = base64.b64encode(CIRCLE.read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]
