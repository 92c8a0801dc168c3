"""The benchmark scripts' shared output: one section of docs/benchmarks.md per script."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine(gpu: bool = False) -> str:
    """The host as a section heading names it: CPU model, architecture, CPU count, and with
    `gpu` the GPUs nvidia-smi names. Shared machines change hosts between days, and figures
    from different CPUs do not compare."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    host = f"{model}, {platform.machine()}, {os.cpu_count()} CPUs"
    if not gpu:
        return host
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    return f"{gpus or 'unknown GPU'}; {host}"


def write_section(path: Path, title: str, text: str) -> None:
    """Replace (or append) the section whose heading starts with `title` in the markdown file."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(title)
    if start >= 0:
        end = old.find("\n## ", start + len(title))
        old = old[:start] + (old[end + 1 :] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old.rstrip() + "\n\n" + text.strip() + "\n")
