"""The benchmark scripts' shared output: one section of docs/benchmarks.md per script."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, title: str, text: str) -> None:
    """Replace (or append) the section whose heading starts with `title` in the markdown file."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(title)
    if start >= 0:
        end = old.find("\n## ", start + len(title))
        old = old[:start] + (old[end + 1 :] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old.rstrip() + "\n\n" + text.strip() + "\n")
