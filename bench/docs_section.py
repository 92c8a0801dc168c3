"""The benchmark scripts' shared output: one section of docs/benchmarks.md per script."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """The host as a section heading names it: CPU model, architecture, CPU count. Shared
    machines change hosts between days, and figures from different CPUs do not compare."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {platform.machine()}, {os.cpu_count()} CPUs"


def write_section(path: Path, title: str, text: str) -> None:
    """Replace (or append) the section whose heading starts with `title` in the markdown file."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(title)
    if start >= 0:
        end = old.find("\n## ", start + len(title))
        old = old[:start] + (old[end + 1 :] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old.rstrip() + "\n\n" + text.strip() + "\n")
