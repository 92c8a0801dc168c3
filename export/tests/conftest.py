"""Shared fixtures for the export tests (tests/fixtures/idefics3-tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmexport import fixtures

EXPORT_DIR = Path(__file__).resolve().parent.parent
REPO = EXPORT_DIR.parent
FIXTURE = REPO / "tests" / "fixtures" / "idefics3-tiny"

REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}
IMAGE_CASES = [name for name, case in CASES.items() if case["pixel_values"] is not None]


def load_array(entry):
    if entry is None:
        return None
    array = fixtures.load_array(FIXTURE / entry["file"])
    assert list(array.shape) == entry["shape"] and str(array.dtype) == entry["dtype"]
    return array


def case_inputs(name):
    case = CASES[name]
    return (
        np.array([case["input_ids"]], np.int64),
        load_array(case["pixel_values"]),
        load_array(case["pixel_attention_mask"]),
    )


def images_of(pv, pam):
    """The family's images dict for OnnxPackage.greedy and the torch helpers."""
    return None if pv is None else {"pixel_values": pv, "pixel_attention_mask": pam}


@pytest.fixture(scope="session")
def torch_model():
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(FIXTURE / "checkpoint", attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def fp32_package():
    from vlmexport.export.onnx_runner import OnnxPackage

    return OnnxPackage(FIXTURE / REFERENCE["package"], "fp32")
