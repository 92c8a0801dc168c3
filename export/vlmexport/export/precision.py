"""Precision variants derived from the FP32 graphs.

fp32  the exported graphs as they are.
fp16  weights and most activations in float16; the KV cache's inputs and outputs too
      (a step casts no cache, which grows with the context); the other inputs and
      outputs stay float32.
int8  8-bit weights: the decoder's MatMul weights in blocks for MatMulNBits,
      the token table in blocks of a row (to_int8_table), the vision encoder's
      MatMul weights by dynamic quantization (to_int8); activations, the KV cache
      and the remaining weights (convolutions, position tables) stay fp32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Variant:
    name: str
    suffix: str
    weight_dtype: str  # dtype of the matmul weights in this variant


VARIANTS = {
    "fp32": Variant("fp32", "", "float32"),
    "fp16": Variant("fp16", "_fp16", "float16"),
    "int8": Variant("int8", "_int8", "int8"),
}

# Ops whose fp16 versions lose too much: reductions and normalisations
# (x**2 overflows fp16 for activations above ~256), softmax. They run in fp32
# with casts around them; the matmuls, which hold the weights, are fp16.
FP16_OP_BLOCK_LIST = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LayerNormalization"]


def parse_precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        from vlmexport.errors import ExportError

        raise ExportError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in names:
        # Every other variant is derived from, and checked against, fp32.
        names.insert(0, "fp32")
    return list(dict.fromkeys(names))


def graph_path(onnx_dir: Path, graph: str, variant: str) -> Path:
    return onnx_dir / f"{graph}{VARIANTS[variant].suffix}.onnx"


def make_variant(variant: str, graph: str, fp32_path: Path, out_path: Path) -> None:
    if variant == "fp16":
        to_fp16(fp32_path, out_path)
    elif variant == "int8":
        quantize = {"decoder_model_merged": to_int8_blockwise, "embed_tokens": to_int8_table}.get(graph, to_int8)
        quantize(fp32_path, out_path)
    else:
        raise ValueError(variant)


def to_fp16(src: Path, dst: Path, check: bool = True) -> None:
    """`check`: onnx's checker on the result (it refuses ONNX Runtime's contrib ops that sit in
    the default domain, such as SimplifiedLayerNormalization in hand-built graphs)."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    # The exporter's value_info would otherwise keep stale fp32 types that the
    # converter trusts; the converter re-infers them.
    del model.graph.value_info[:]
    _isolate_graph_outputs(model)
    _unshare_small_initializers(model)
    with warnings.catch_warnings():
        # "-3.4e38 will be truncated to -10000": the attention mask fill value;
        # -1e4 still zeroes the softmax weight in fp16.
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_OP_BLOCK_LIST,
            node_block_list=_fp32_nodes(model),
        )
    _fix_float_casts(model)
    _drop_fp16_round_trips(model)
    _cache_in_fp16(model)
    from vlmexport.export.onnx_graph import save_model

    save_model(model, dst)
    if check:
        onnx.checker.check_model(str(dst))


def _isolate_graph_outputs(model: onnx.ModelProto) -> None:
    """Give every graph output its own Identity node.

    The decoder's present.{i}.key is also read inside the graph (attention
    uses the concatenated cache). onnxconverter-common renames the producer of
    a graph output to insert the fp16->fp32 cast, but leaves the internal
    readers on the old (now fp32) name, which makes the graph invalid.
    """
    outputs = {o.name for o in model.graph.output}
    renamed = {}
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in outputs:
                renamed[name] = node.output[i] = f"{name}__value"
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for name, value in renamed.items():
        model.graph.node.append(helper.make_node("Identity", [value], [name], name=f"{name}__identity"))


def _unshare_small_initializers(model: onnx.ModelProto, max_bytes: int = 1 << 20) -> None:
    """Give every reader of a small shared initializer its own copy.

    The exporter stores identical constants once: with freshly initialised weights every zero
    bias is one tensor, read by LayerNormalization (kept fp32) and by the attention Adds
    (fp16). The converter then keeps the shared tensor fp32 and the Adds mix float16 and
    float, which ONNX Runtime refuses to load. Large shared weights (tied embeddings) are left
    alone; they are never read by both kinds of op.
    """
    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in initializers:
                readers.setdefault(name, []).append((node, index))
    for name, uses in readers.items():
        tensor = initializers[name]
        if len(uses) < 2 or len(tensor.raw_data or b"") + 4 * len(tensor.float_data) > max_bytes:
            continue
        for k, (node, index) in enumerate(uses[1:], start=1):
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = f"{name}__{k}"
            model.graph.initializer.append(copy)
            node.input[index] = copy.name


# Where float arithmetic becomes an angle or a decision: rotary angles (Cos, Sin) and the
# comparisons that turn fractional coordinates into position ids (idefics3's patch buckets).
_PRECISION_SENSITIVE_OPS = ("Cos", "Sin", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal")


def _fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that must stay fp32: everything upstream of an angle or a comparison.

    position * inv_freq: fp16 has a spacing of 0.5 at 1000, so angles of late positions would
    be off by up to half a radian. Patch coordinates: in fp16 the fractions k/n and the bucket
    boundaries round apart, so a tenth of idefics3's patches take their neighbour's position
    embedding. Blocking the whole upstream region (not just the last op) also avoids casting a
    shared tensor twice, which the converter names identically. The walk stops at Shape and
    Size: their outputs do not depend on the values upstream, and going past them would keep
    the vision tower itself in fp32.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    blocked: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in _PRECISION_SENSITIVE_OPS]
    while stack:
        node = stack.pop()
        if node.name in blocked:
            continue
        blocked.add(node.name)
        if node.op_type not in ("Shape", "Size"):
            stack.extend(producer[i] for i in node.input if i in producer)
    return sorted(blocked)


def _cast_to(node: onnx.NodeProto | None) -> int | None:
    """The element type a Cast node casts to; None for any other node."""
    if node is None or node.op_type != "Cast":
        return None
    return next(a.i for a in node.attribute if a.name == "to")


def _drop_fp16_round_trips(model: onnx.ModelProto) -> None:
    """Let fp32 nodes read each other's outputs without a pass through fp16.

    The converter casts every blocked node's output to fp16 and back before the next blocked
    node, and removes such a pair only when the value has one reader: the rotary angles (read
    by Cos and Sin) and the patch coordinates (read by several comparisons) lost the precision
    that blocking them was for. Each Cast(fp32) of a Cast(fp16) of an fp32 value now reads that
    value; an fp16 cast left with no reader goes.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in model.graph.node:
        first = producer.get(node.input[0]) if _cast_to(node) == TensorProto.FLOAT else None
        if _cast_to(first) == TensorProto.FLOAT16 and declared.get(first.input[0]) == TensorProto.FLOAT:
            node.input[0] = first.input[0]
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    unread = [n for n in model.graph.node if _cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in read]
    for node in unread:
        model.graph.node.remove(node)


# The decoder's cache tensors (families/shared.py): the older and recent blocks it reads, the
# block or buffer it returns.
KV_CACHE_PREFIXES = ("older_key_values.", "past_key_values.", "present.")


def _cache_in_fp16(model: onnx.ModelProto) -> None:
    """Make the KV cache's graph inputs and outputs fp16, as the graph computes it.

    keep_io_types left every float input and output fp32 behind a cast: for the cache that is
    a cast of the whole cache, both ways, at every step (and on a GPU, twice its bytes moved).
    A cast to fp16 after a cache input goes (its readers read the input); a reader kept in
    fp32 gets its own cast; a cast to fp32 before a cache output goes (the fp16 value is
    renamed to the output).
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def rename(old: str, new: str) -> None:
        for node in graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]

    for value in graph.input:
        if not value.name.startswith(KV_CACHE_PREFIXES) or value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
        for reader in [n for n in graph.node if value.name in n.input]:
            if _cast_to(reader) == TensorProto.FLOAT16:
                graph.node.remove(reader)
                rename(reader.output[0], value.name)
            else:
                widened = f"{value.name}__fp32_for_{reader.name}"
                graph.node.insert(
                    0, helper.make_node("Cast", [value.name], [widened], name=widened, to=TensorProto.FLOAT)
                )
                reader.input[:] = [widened if name == value.name else name for name in reader.input]
    for value in graph.output:
        if not value.name.startswith(KV_CACHE_PREFIXES) or value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
        cast = producer.get(value.name)
        if _cast_to(cast) == TensorProto.FLOAT:
            graph.node.remove(cast)
            rename(cast.input[0], value.name)
        else:
            narrowed = f"{value.name}__fp32"
            rename(value.name, narrowed)
            graph.node.append(
                helper.make_node("Cast", [narrowed], [value.name], name=value.name, to=TensorProto.FLOAT16)
            )
    kept = {v.name for v in list(graph.input) + list(graph.output)}
    stale = [v for v in graph.value_info if v.name in kept]
    for v in stale:
        graph.value_info.remove(v)


def _fix_float_casts(model: onnx.ModelProto) -> None:
    """Retarget Cast(to=float) nodes whose output the converter declared fp16.

    onnxconverter-common changes value types but not Cast's `to` attribute.
    """
    declared = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        to = next(a for a in node.attribute if a.name == "to")
        if to.i == TensorProto.FLOAT and declared.get(node.output[0]) == TensorProto.FLOAT16:
            to.i = TensorProto.FLOAT16


def to_int8(src: Path, dst: Path) -> None:
    """Dynamic quantization: QInt8 weights, activations quantized per tensor at run time.

    Right for graphs that run many rows at once (the vision encoder): ONNX Runtime's
    MatMulInteger takes its AMX/VNNI GEMM kernels, twice as fast on a tile as
    MatMulNBits, whose 8-bit kernels are made for few rows.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a "consider pre-processing" hint on every call.
    logging.getLogger().setLevel(logging.ERROR)
    # Beside src, so that external weights are found where they are (onnx refuses them behind
    # a symbolic or hard link).
    inferable = src.with_name(f"{src.stem}.inferable.onnx")
    try:
        _without_value_info(src, inferable)
        quantize_dynamic(
            str(inferable),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            # Only weight matmuls; Q@K^T and attn@V have no constant operand. Outputs of fused
            # contrib ops (--optimize) have no inferred type: they are float.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=needs_external_data(src),
        )
    finally:
        inferable.unlink(missing_ok=True)


def to_int8_blockwise(src: Path, dst: Path) -> None:
    """MatMulNBits: symmetric 8-bit weights in blocks of 128 along K, int8 compute.

    A decode step reads every weight for one token. Dynamic quantization spends five
    nodes on each matmul (quantize the activations, MatMulInteger, cast, two scales);
    one MatMulNBits node per matmul is faster, with less logit error (a scale per block
    of 128, not per tensor). Accuracy level 4 quantizes each activation row per block to
    int8 and runs VNNI dot products; levels 0-3 dequantize the weights to float on every
    call. Smaller blocks were slower on a long prefill for little accuracy. The projections
    that read one activation are one node (merge_shared_input_matmuls). The figures are in
    docs/benchmarks.md ("Measurements behind design choices").
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=8)
    # Only MatMuls with a constant weight are quantized; Q@K^T and attn@V stay fp32.
    model = onnx.load(str(src))
    merge_shared_input_matmuls(model)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=needs_external_data(src))


# Columns per scale in an int8 token table (as llama.cpp's Q8_0 blocks).
TABLE_BLOCK = 32


def to_int8_table(src: Path, dst: Path, block: int = TABLE_BLOCK) -> None:
    """Every Gather over a constant 2-D float table (the token embeddings) reads an int8 copy of
    it with a symmetric scale per block of `block` columns of a row (the whole row if its width
    is not a multiple): Gather the rows and their scales, Cast, Mul by block. The table is the
    largest weight a package otherwise holds in float, while a lookup reads a few rows, so the
    product costs nothing worth measuring (figures: docs/benchmarks.md). Plain ONNX ops, so
    every provider runs it.
    """
    model = onnx.load(str(src))
    graph = model.graph
    tables = {
        init.name: init for init in graph.initializer if len(init.dims) == 2 and init.data_type == TensorProto.FLOAT
    }
    replaced, quantized = {}, set()
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0:
            continue
        name = table.name
        rows, width = table.dims
        size = block if width % block == 0 else width
        if name not in quantized:
            blocks = numpy_helper.to_array(table).reshape(rows, width // size, size)
            scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
            values = np.rint(blocks / np.where(scale == 0, 1, scale)).astype(np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(values.reshape(rows, width), f"{name}.int8"),
                    numpy_helper.from_array(scale, f"{name}.scale"),
                    numpy_helper.from_array(np.array([0, 0, width // size, size]), f"{name}.blocks"),
                    numpy_helper.from_array(np.array([0, 0, width]), f"{name}.width"),
                ]
            )
            quantized.add(name)
        out, ids = node.output[0], node.input[1]
        replaced[id(node)] = [
            helper.make_node("Gather", [f"{name}.int8", ids], [f"{out}.int8"]),
            helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{out}.float", f"{name}.blocks"], [f"{out}.blocks"]),
            helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.scale"]),
            helper.make_node("Mul", [f"{out}.blocks", f"{out}.scale"], [f"{out}.scaled"]),
            helper.make_node("Reshape", [f"{out}.scaled", f"{name}.width"], [out]),
        ]
    _replace_nodes(graph, replaced, quantized)
    onnx.save(model, str(dst))


def merge_shared_input_matmuls(model: onnx.ModelProto) -> int:
    """Replace the MatMuls with a constant 2-D weight that read one activation (a layer's query,
    key and value projections; its gate and up projections) by one MatMul over their weights
    side by side and a Split of its last axis. Returns the number of groups merged.

    For the int8 decoder (to_int8_blockwise): its decode steps are bound by their node count,
    not their bytes, and each MatMulNBits quantizes its activation again. Every output column is
    the same dot product as before, and MatMulNBits quantizes each column's blocks alone, so no
    value changes. The fp32 decoder keeps its projections (its steps are bound by the weights'
    bytes; merged, a long prefill was slower), and so do the per-tensor int8 graphs, where
    merged projections would share one scale.
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
    _replace_nodes(graph, replaced, {node.input[1] for nodes in groups.values() for node in nodes})
    return len(groups)


def _replace_nodes(graph, replaced: dict, old_weights: set[str]) -> None:
    """Put replaced[id(node)] (a list, maybe empty) where each such node was, and drop the
    initializers of old_weights that no node reads any more (one that a node left alone still
    reads stays)."""
    kept = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(kept)
    unread = old_weights - _names_read(kept)
    for init in [init for init in graph.initializer if init.name in unread]:
        graph.initializer.remove(init)


def _names_read(nodes) -> set[str]:
    """Every name the nodes read, their subgraphs' nodes included (those read outer names too)."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                read |= _names_read(subgraph.node)
    return read


def _without_value_info(src: Path, dst: Path) -> None:
    """A copy of src without the exporter's intermediate shapes.

    The quantizer re-runs strict shape inference, which rejects some shapes the
    exporter recorded (Qwen2-VL's vision attention splits one qkv projection
    into three and keeps the unsplit width on the parts); inferred from
    scratch they agree. External weights are not loaded: dst, in src's folder, refers to
    src's weight file.
    """
    model = onnx.load(str(src), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(dst))


def needs_external_data(src: Path) -> bool:
    """Whether a variant of src goes to external data: an fp32 graph near protobuf's 2 GB limit
    (its int8 variant keeps embeddings and other non-MatMul weights in fp32)."""
    return src.stat().st_size + _external_bytes(src) > 1_800_000_000


def _external_bytes(path: Path) -> int:
    data = path.with_name(f"{path.name}.data")
    return data.stat().st_size if data.exists() else 0
