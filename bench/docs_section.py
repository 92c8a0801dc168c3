"""The benchmark scripts' shared pieces: alternated timing, and one section of
docs/benchmarks.md per script."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
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


def alternated_medians(runners: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median seconds of each runner (a callable): `runs` calls per runner and round, the
    order reversed every other round, so a shared machine's drift falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for round_ in range(rounds):
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            for _ in range(runs):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def publish(out: Path | None, heading: str, intro: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print `## heading (machine)`, the intro and a table, and replace that section in `out`."""
    text = "\n".join(
        [
            f"## {heading} ({machine()})",
            "",
            intro,
            "",
            "| " + " | ".join(columns) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    )
    print(text)
    if out:
        write_section(out, f"## {heading}", text)
