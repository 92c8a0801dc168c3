#!/usr/bin/env python
"""Export a Hugging Face vision-language model to a vlmserve ONNX package.

    python -m vlmexport.export --model HuggingFaceTB/SmolVLM-256M-Instruct \
        --out models/smolvlm-256m --precisions fp32,fp16,int8

SRC is a hub id or a local save_pretrained folder (model + processor). See
export/README.md for the package layout, variants.json and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlmexport import families
from vlmexport.errors import ExportError
from vlmexport.export.package_io import atomic_package_dir, check_writable, write_json
from vlmexport.export.precision import VARIANTS, graph_path, parse_precisions

VARIANTS_FORMAT_VERSION = 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vlmexport.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub id or local save_pretrained folder")
    parser.add_argument("--out", required=True, type=Path, help="package folder to write (replaced atomically)")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32,fp16,int8 (fp32 is always included)")
    parser.add_argument(
        "--optimize", action="store_true", help="apply ONNX Runtime transformer fusions (kept only if parity holds)"
    )
    parser.add_argument(
        "--attention",
        choices=("grouped", "fused"),
        default="grouped",
        help="the decoder's attention: grouped (ONNX ops, the cache in two blocks per layer) or fused "
        "(com.microsoft.GroupQueryAttention, one cache buffer per layer written in place)",
    )
    parser.add_argument("--report-tokens", type=int, default=24, help="greedy tokens compared in the report")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |fp32 - PyTorch| on logits and image features")
    return parser.parse_args(argv)


def read_model_type(src: str) -> str | None:
    """model_type from config.json, without loading transformers or the weights."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"--model {src} is a file, expected a model folder or a hub id")
        config = path / "config.json"
        if not config.is_file():
            raise ExportError(f"{src} is not a model folder (no config.json)")
    else:
        config = _download_config(src)
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ExportError(f"{config} is not a valid JSON model config") from None


def _download_config(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # the hub client raises many types (offline, 404, bad id)
        raise ExportError(
            f"--model {repo_id!r} is neither a local folder nor a reachable hub model ({type(e).__name__})"
        ) from None


def export_package(args: argparse.Namespace) -> dict:
    variants = parse_precisions(args.precisions)
    family = families.family_for(read_model_type(args.model))
    check_writable(args.out)

    log(f"loading {args.model} ({family.NAME} family)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would clutter stderr
    try:
        model, processor = family.load(args.model)
    except Exception as e:  # broken checkpoint or missing processor dependency: report, don't trace
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(
            f"could not load model/processor from {args.model}: {type(e).__name__}: {first_line}"
        ) from None

    with atomic_package_dir(args.out) as staging:
        write_model_files(model, processor, staging)
        onnx_dir = staging / "onnx"
        onnx_dir.mkdir()
        export_fp32(family, model, onnx_dir, args.attention == "fused")
        # Under --optimize, int8 quantizes the fused fp32 graphs (the quantizer passes contrib
        # ops through); fp16 is always made from the unfused ones, which its converter knows.
        from_fused = {"fp32", "int8"} if args.optimize else {"fp32"}
        for variant in variants[1:]:
            if variant not in from_fused:
                make_variants(family, variant, onnx_dir)
        fused = None
        if args.optimize:
            from vlmexport.export.optimize import optimize_package

            log("fusing fp32 graphs")
            fused = optimize_package(family, onnx_dir, args.atol, args.attention == "fused")
        for variant in variants[1:]:
            if variant in from_fused:
                make_variants(family, variant, onnx_dir)
        manifest = variants_manifest(family, onnx_dir, variants, fused or {}, from_fused)
        write_json(onnx_dir / "variants.json", manifest)

        from vlmexport.export.report import build_report

        log("checking parity")
        report = build_report(family, model, processor, staging, variants, args.report_tokens, args.atol)
        report = {
            "model": model_label(args.model),
            "family": family.NAME,
            "optimized_fp32_max_abs_diff": fused,
            **report,
        }
        write_json(staging / "export_report.json", report)
    return report


def model_label(src: str) -> str:
    # A local path would make the report differ between machines.
    return f"local:{Path(src).resolve().name}" if Path(src).exists() else src


def write_model_files(model, processor, out: Path) -> None:
    """config.json, generation_config.json and the processor/tokenizer files."""
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)


def export_fp32(family, model, onnx_dir: Path, fused_attention: bool) -> None:
    from vlmexport.export.onnx_graph import export_graph

    for spec in family.graph_specs(model, fused_attention):
        log(f"exporting {spec.name}")
        export_graph(spec, graph_path(onnx_dir, spec.name, "fp32"))


def make_variants(family, variant: str, onnx_dir: Path) -> None:
    from vlmexport.export.precision import make_variant

    log(f"making {variant} variant")
    for graph in family.GRAPHS:
        make_variant(variant, graph, graph_path(onnx_dir, graph, "fp32"), graph_path(onnx_dir, graph, variant))


def variants_manifest(family, onnx_dir: Path, variants: list[str], fused: dict, from_fused: set[str]) -> dict:
    """variants.json: per variant and graph, the file, weight dtype and I/O element types."""
    from vlmexport.export.onnx_graph import initializer_bytes_by_dtype, io_types

    manifest = {"format_version": VARIANTS_FORMAT_VERSION, "family": family.NAME, "default": "fp32", "variants": {}}
    for variant in variants:
        graphs = {}
        for graph in family.GRAPHS:
            path = graph_path(onnx_dir, graph, variant)
            inputs, outputs = io_types(path)
            entry = {
                "file": f"onnx/{path.name}",
                "weight_dtype": VARIANTS[variant].weight_dtype,
                # Fused graphs use com.microsoft contrib ops (ONNX Runtime only).
                "fused": variant in from_fused and graph in fused,
                "initializer_bytes": initializer_bytes_by_dtype(path),
                "inputs": inputs,
                "outputs": outputs,
            }
            kv = {t for name, t in inputs.items() if name.startswith("past_key_values.")}
            if kv:
                entry["kv_cache_dtype"] = kv.pop()
            graphs[graph] = entry
        manifest["variants"][variant] = {"suffix": VARIANTS[variant].suffix, "graphs": graphs}
    return manifest


def log(message: str) -> None:
    print(f"[export {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = export_package(args)
    except ExportError as e:
        print(f"vlmexport.export: error: {e}. Supported families: {families.supported_text()}", file=sys.stderr)
        return 2
    log(f"wrote {args.out}")
    for variant, figures in report["variants"].items():
        log(f"{variant}: {json.dumps(figures)}")
    return 0
