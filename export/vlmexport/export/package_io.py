"""Writing a package folder atomically.

The export writes into a hidden temporary folder next to the destination and
only renames it into place once every file (graphs, variants.json, report) is
written and checked. A crash or a failed parity check therefore never leaves a
half-written folder that looks like a complete package.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from vlmexport.errors import ExportError


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _staging_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"


def check_writable(out_dir: Path) -> None:
    """Fail early (before loading a model for minutes) if out_dir cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a folder")
    probe = _staging_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        (probe / ".probe").write_text("")
    except OSError as e:
        raise ExportError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def atomic_package_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces out_dir, on error it is deleted."""
    staging = _staging_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Move any previous package aside first so the swap is two renames, never a
    # state where out_dir holds a mix of old and new files.
    backup = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(backup)
    staging.rename(out_dir)
    shutil.rmtree(backup, ignore_errors=True)
