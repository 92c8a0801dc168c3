"""Exporting one torch module to one ONNX graph, and reading graphs back.

Family modules describe each graph with a GraphSpec; this module owns the
exporter call so every family exports the same way.

We use the dynamo exporter (torch.onnx.export(dynamo=True)): with torch 2.15
the legacy TorchScript exporter mis-types the Idefics3 vision position ids
(aten::full without dtype becomes float, then Gather rejects it) and cannot
export Tensor.unfold with dynamic sizes, while the dynamo exporter handles the
vision tower, the KV cache (including past length 0) and left padding.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

OPSET = 18
# Models above this size must keep their weights in an external data file
# (protobuf's 2 GB limit); we switch a bit earlier to leave headroom.
EXTERNAL_DATA_BYTES = 1_800_000_000

ONNX_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass
class GraphSpec:
    """Everything needed to export one graph of a package."""

    name: str  # file stem, e.g. "decoder_model_merged"
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any
    # Readable names for output axes the exporter names by formula
    # (e.g. "past_sequence_length + sequence_length").
    output_dim_names: dict[str, dict[int, str]] = field(default_factory=dict)
    # The exporter's translations of custom ops in the module (torch op -> onnxscript function).
    translations: dict = field(default_factory=dict)


def export_graph(spec: GraphSpec, path: Path) -> None:
    """Export spec.module to path (weights inline unless the graph is too big)."""
    module = spec.module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _quiet_exporter_logs()
        program = torch.onnx.export(
            module,
            spec.args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            custom_translation_table=spec.translations or None,
            optimize=True,
            verbose=False,
        )
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    tidy_graph(path, spec.output_dim_names)


def _quiet_exporter_logs() -> None:
    # The exporter logs progress and "torchvision is not installed" warnings;
    # they are noise for users of the exporter.
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def tidy_graph(path: Path, output_dim_names: dict[str, dict[int, str]]) -> None:
    """Rename formula-named output axes and drop the exporter's per-node metadata.

    The metadata holds Python stack traces with absolute paths of the machine
    that exported: it leaks paths, makes files differ between machines, and
    is a large share of a small graph.
    """
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        for axis, dim_name in output_dim_names.get(out.name, {}).items():
            out.type.tensor_type.shape.dim[axis].dim_param = dim_name
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.metadata_props[:]
    # Saved without loading external data: external weights keep pointing at
    # the file the exporter wrote next to the graph.
    onnx.save(model, str(path))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save inline, or with weights in `<file>.data` when protobuf's 2 GB limit requires it."""
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))


def io_types(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Element types of a graph's inputs and outputs, as numpy-style names."""
    model = onnx.load(str(path), load_external_data=False)

    def types(values):
        return {v.name: ONNX_DTYPE_NAMES.get(v.type.tensor_type.elem_type, "unknown") for v in values}

    return types(model.graph.input), types(model.graph.output)


def initializer_bytes_by_dtype(path: Path) -> dict[str, int]:
    """How many bytes of weights each dtype holds (a measured check on the variant's weight dtype)."""
    model = onnx.load(str(path), load_external_data=True)
    totals: dict[str, int] = {}
    for init in model.graph.initializer:
        dtype = ONNX_DTYPE_NAMES.get(init.data_type, "other")
        n = 1
        for d in init.dims:
            n *= d
        totals[dtype] = totals.get(dtype, 0) + n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return dict(sorted(totals.items()))
