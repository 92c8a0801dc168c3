"""vlmserve's Python side: Hugging Face models to ONNX packages (`export`), the test fixtures and
the benchmark model (`fixtures`), and the default model's trainer (`training`). Model families
live in `families`, one module each."""

import os
import subprocess
import sys
from pathlib import Path


def run_export(*args: str) -> None:
    """`python -m vlmexport.export ARGS` in a process of its own (its memory goes with it),
    finding this package whether it is installed or not."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "vlmexport.export", *args], check=True, env=env)
