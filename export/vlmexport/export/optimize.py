"""--optimize: ONNX Runtime transformer fusions on the fp32 graphs.

Fusions (SkipLayerNormalization, SimplifiedLayerNormalization, FastGelu...)
are applied to the fp32 graphs only, after the fp16/int8 variants have been
derived from the unfused graphs: the fp16 converter and the quantizer work on
standard ONNX ops, and fused contrib ops in fp16 are not implemented by every
execution provider. In the decoder, the projections that read one activation are
then merged into one MatMul (merge_shared_input_matmuls). A fused graph is kept
only if its outputs match the unfused graph within the fp32 tolerance; otherwise
the export fails (the final report then also re-checks fused fp32 against PyTorch).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

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
        _fuse(path, fused, *settings, merge_projections=graph == "decoder_model_merged")
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


def _fuse(src: Path, dst: Path, model_type: str, num_heads: int, hidden_size: int, merge_projections: bool) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer prints fusion statistics on stdout; keep export output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0
        )
    if merge_projections:
        merge_shared_input_matmuls(model.model)
    # Writes `<dst>.data` beside dst when the weights exceed protobuf's limit.
    model.save_model_to_file(str(dst), use_external_data_format=needs_external_data(src))


def merge_shared_input_matmuls(model: onnx.ModelProto) -> int:
    """Replace the MatMuls with a constant 2-D weight that read one activation (a layer's query,
    key and value projections; its gate and up projections) by one MatMul over their weights
    side by side and a Split of its last axis. Returns the number of groups merged.

    A decode step multiplies one row per sequence, so each node's fixed cost (and, in the int8
    variant, each quantization of the activation) counts for as much as its weights; every
    output column is the same dot product as before, so the values do not change, and
    MatMulNBits quantizes each column's blocks alone, so neither do the int8 weights. Only the
    decoder gets it: the vision encoder's int8 weights are quantized per tensor, where merged
    projections would share one scale.
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    groups = {x: nodes for x, nodes in groups.items() if len(nodes) > 1}
    replaced = {}
    for i, (activation, nodes) in enumerate(groups.items()):
        parts = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        name = f"merged_projection_{i}"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(parts, axis=1), f"{name}.weight"))
        graph.initializer.append(numpy_helper.from_array(np.array([p.shape[1] for p in parts]), f"{name}.split"))
        first, *rest = nodes
        replaced[id(first)] = [
            helper.make_node("MatMul", [activation, f"{name}.weight"], [f"{name}.out"], name=name),
            helper.make_node(
                "Split", [f"{name}.out", f"{name}.split"], [n.output[0] for n in nodes], name=f"{name}.split", axis=-1
            ),
        ]
        replaced.update({id(node): [] for node in rest})
    kept = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(kept)
    read = _names_read(kept)
    unread = [init for init in graph.initializer if init.name not in read]
    for init in unread:
        graph.initializer.remove(init)
    return len(groups)


def _names_read(nodes) -> set[str]:
    """Every name the nodes read, their subgraphs' nodes included (those read outer names too)."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                read |= _names_read(subgraph.node)
    return read


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
