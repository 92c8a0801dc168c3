"""Parity checks and export_report.json.

fp32 vs PyTorch: image features, and logits along one greedy path: the
prefill logits of every prompt position plus each decode step (KV cache
path), compared with a single full-sequence PyTorch forward pass over the same
tokens. The greedy tokens themselves are compared with model.generate.

Other variants vs fp32: teacher-forced along the fp32 greedy path (so logits
are compared position by position even after the tokens would diverge), and
free greedy decoding to count agreeing tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmexport.errors import ExportError
from vlmexport.export.onnx_runner import OnnxPackage
from vlmexport.families import shared


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _path_logits(result) -> np.ndarray:
    """The rows that chose each token, [tokens, vocab]."""
    return np.stack(result.logits)


def _agreement(tokens: list[int], reference: list[int]) -> dict:
    same = sum(a == b for a, b in zip(tokens, reference))
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return {"greedy_tokens_agree": same, "greedy_common_prefix": prefix, "greedy_tokens": len(reference)}


def fp32_parity(family, model, package_dir: Path, inputs: dict, n_tokens: int) -> tuple[dict, list[int]]:
    onnx_pkg = OnnxPackage(package_dir, "fp32")
    ids, images = inputs["input_ids"], inputs["images"]

    features = onnx_pkg.image_features(family.vision_feeds(images, onnx_pkg.config))
    torch_features = family.torch_image_features(model, images)
    feature_diff = _max_diff(features.reshape(torch_features.shape), torch_features)

    # No eos stop: always compare n_tokens steps.
    result = onnx_pkg.greedy(ids, images, max_new_tokens=n_tokens, eos_token_ids=[])
    torch_logits = family.torch_path_logits(model, ids, images, result.tokens)
    logit_diff = _max_diff(_path_logits(result), torch_logits)

    torch_tokens = family.torch_greedy(model, ids, images, max_new_tokens=n_tokens)
    report = {
        "max_abs_logit_diff_vs_pytorch": logit_diff,
        "max_abs_image_features_diff_vs_pytorch": feature_diff,
        "compared_positions": int(torch_logits.shape[0]),
        **_agreement(result.tokens, torch_tokens[: len(result.tokens)]),
    }
    return report, result


def variant_parity(package_dir: Path, variant: str, inputs: dict, fp32_result) -> dict:
    pkg = OnnxPackage(package_dir, variant)
    ids, images = inputs["input_ids"], inputs["images"]
    forced = pkg.greedy(ids, images, forced_tokens=fp32_result.tokens)
    free = pkg.greedy(ids, images, max_new_tokens=len(fp32_result.tokens), eos_token_ids=[])
    # Per-step argmax under teacher forcing: unlike free decoding, one early
    # flip does not make every later token disagree.
    forced_agree = sum(int(np.argmax(row)) == token for row, token in zip(forced.logits, fp32_result.tokens))
    return {
        "max_abs_logit_diff_vs_fp32": _max_diff(_path_logits(forced), _path_logits(fp32_result)),
        **_agreement(free.tokens, fp32_result.tokens),
        "teacher_forced_argmax_agree": forced_agree,
    }


def build_report(family, model, processor, package_dir: Path, variants: list[str], n_tokens: int, atol: float) -> dict:
    inputs = shared.reference_inputs(processor, family.processor_images)
    fp32, fp32_result = fp32_parity(family, model, package_dir, inputs, n_tokens)
    worst = max(fp32["max_abs_logit_diff_vs_pytorch"], fp32["max_abs_image_features_diff_vs_pytorch"])
    if worst > atol:
        raise ExportError(
            f"fp32 ONNX graphs differ from PyTorch by {worst:.3g} (> tolerance {atol:g}); package not written"
        )
    report = {
        "reference": {
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
            "new_tokens": n_tokens,
            "fp32_greedy_tokens": fp32_result.tokens,
        },
        "tolerance_fp32": atol,
        "variants": {"fp32": fp32},
    }
    for variant in variants:
        if variant != "fp32":
            report["variants"][variant] = variant_parity(package_dir, variant, inputs, fp32_result)
    return report
