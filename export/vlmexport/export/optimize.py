"""--optimize: ONNX Runtime transformer fusions on the fp32 graphs.

Fusions (SkipLayerNormalization, SimplifiedLayerNormalization, FastGelu...)
are applied to the fp32 graphs only, after the fp16/int8 variants have been
derived from the unfused graphs: the fp16 converter and the quantizer work on
standard ONNX ops, and fused contrib ops in fp16 are not implemented by every
execution provider. A fused graph is kept only if its outputs match the unfused
graph within the fp32 tolerance; otherwise the export fails (the final report
then also re-checks fused fp32 against PyTorch).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmexport.errors import ExportError
from vlmexport.export.precision import graph_path, needs_external_data


def optimize_package(family, onnx_dir: Path, atol: float, fused_attention: bool = False) -> dict:
    """Fuse each fp32 graph in place; returns {graph: max |fused - unfused|}."""
    config = json.loads((onnx_dir.parent / "config.json").read_text())
    diffs = {}
    for graph, settings in family.optimizer_settings(config).items():
        if settings is None:
            continue
        path = graph_path(onnx_dir, graph, "fp32")
        # Under the graph's own name in a folder of its own, so that weights above protobuf's
        # limit go to `<name>.data` as they will be named once the fused graph replaces it.
        fused = onnx_dir / "fused" / path.name
        fused.parent.mkdir(exist_ok=True)
        _fuse(path, fused, *settings)
        feeds = family.sample_feeds(config, graph, fused_attention=fused_attention)
        diff = max(np.abs(a - b).max() for a, b in zip(_run(path, feeds), _run(fused, feeds)))
        if not diff <= atol:
            shutil.rmtree(fused.parent)
            raise ExportError(
                f"--optimize changed {graph} outputs by {diff:.3g} (> {atol:g}); export without --optimize"
            )
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        for file in fused.parent.iterdir():
            shutil.move(file, onnx_dir / file.name)
        fused.parent.rmdir()
        diffs[graph] = float(diff)
    return diffs


def _fuse(src: Path, dst: Path, model_type: str, num_heads: int, hidden_size: int) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer prints fusion statistics on stdout; keep export output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0
        )
    # Writes `<dst>.data` beside dst when the weights exceed protobuf's limit.
    model.save_model_to_file(str(dst), use_external_data_format=needs_external_data(src))


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
