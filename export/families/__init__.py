"""Registry of model families, keyed by config.json's model_type.

A family module provides: NAME, MODEL_TYPES, GRAPHS, IMAGE_KEYS, load(src),
graph_specs(model), reference_inputs(processor), processor_images(inputs)
(the image arrays of a processor output, the `images` dict the other
functions take), vision_feeds(images, config), torch_image_features,
torch_path_logits, torch_greedy, prompt_embeddings, prompt_positions,
step_positions, optimizer_settings, sample_feeds and reference_arrays (what
make_fixtures.py records per case) (see idefics3.py).
Adding a family means adding one module and one line below.
Family modules import torch lazily so that resolving a family (and rejecting
bad input) stays instant.
"""

from __future__ import annotations

from types import ModuleType

from . import idefics3, qwen2_vl

FAMILIES: list[ModuleType] = [idefics3, qwen2_vl]

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.MODEL_TYPES}


def supported_text() -> str:
    """e.g. 'idefics3 (model_type: idefics3, smolvlm)'."""
    return "; ".join(f"{f.NAME} (model_type: {', '.join(f.MODEL_TYPES)})" for f in FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    from errors import ExportError

    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise ExportError(f"unsupported model_type {model_type!r}")
    return family
