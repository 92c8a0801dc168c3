"""Registry of model families, keyed by config.json's model_type.

A family is a module that satisfies `Family` (see idefics3.py). Adding a family means adding
one module and one line in FAMILIES. Family modules import torch lazily so that resolving a
family (and rejecting bad input) stays instant. What both families do alike lives in
shared.py.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vlmexport.errors import ExportError

from . import idefics3, qwen2_vl


class Family(Protocol):
    """What the exporter, the fixture builder and the reference runner need of a family."""

    NAME: str
    MODEL_TYPES: tuple[str, ...]
    GRAPHS: tuple[str, ...]
    IMAGE_KEYS: tuple[str, ...]

    def load(self, src: str):
        """The transformers model (eval, fp32) and processor of a checkpoint folder or hub id."""

    def graph_specs(self, model, fused_attention: bool = False) -> list:
        """The three graphs to export (onnx_graph.GraphSpec each); fused_attention: the decoder on
        GroupQueryAttention with one cache buffer per layer (shared.py)."""

    def processor_images(self, inputs) -> dict | None:
        """The image arrays of a processor output: the `images` dict the functions below take."""

    def vision_feeds(self, images: dict, config: dict) -> dict:
        """vision_encoder inputs for those images."""

    def reference_arrays(self, model, input_ids, images) -> dict:
        """What a fixture case records beside the prompt."""

    def torch_image_features(self, model, images: dict) -> np.ndarray:
        """transformers' own image features, [image tokens, hidden]."""

    def torch_path_logits(self, model, input_ids, images, tokens) -> np.ndarray:
        """transformers' logits along a given token path (teacher forcing)."""

    def torch_greedy(self, model, input_ids, images=None, max_new_tokens: int = 24) -> list[int]:
        """transformers' greedy tokens."""

    def prompt_positions(self, config: dict, input_ids, images) -> tuple[np.ndarray, int]:
        """The prompt's position ids and the first decode position."""

    def step_positions(self, position: int) -> np.ndarray:
        """Position ids of one decode step."""

    def optimizer_settings(self, config: dict) -> dict:
        """onnxruntime.transformers optimizer (model_type, num_heads, hidden_size) per graph."""

    def sample_feeds(self, config: dict, graph: str, seed: int = 0, fused_attention: bool = False) -> dict:
        """Small valid inputs for one graph (fused_attention: for the fused decoder)."""


FAMILIES: list[Family] = [idefics3, qwen2_vl]

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.MODEL_TYPES}


def supported_text() -> str:
    """e.g. 'idefics3 (model_type: idefics3, smolvlm)'."""
    return "; ".join(f"{f.NAME} (model_type: {', '.join(f.MODEL_TYPES)})" for f in FAMILIES)


def family_for(model_type: str | None) -> Family:
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise ExportError(f"unsupported model_type {model_type!r}")
    return family
