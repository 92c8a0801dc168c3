"""Build the tiny, seeded Qwen2-VL and Qwen2.5-VL checkpoints of the test fixtures.

The real transformers classes (Qwen2VLConfig / Qwen2_5_VLConfig, their
ForConditionalGeneration models, Qwen2VLImageProcessorPil, Qwen2VLProcessor /
Qwen2_5_VLProcessor (without video processor, see qwen2_vl.image_processor_only),
PreTrainedTokenizerFast) with Qwen2-VL-Instruct's chat
template and the family's special tokens; only the sizes and weights are fake.
Image sizes are bounded small (4 to 32 image tokens) so that fixtures stay fast
while images still keep their aspect ratio and span several attention windows.
"""

from __future__ import annotations

import tiny_idefics3
from families import qwen2_vl
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen2-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# As in Qwen2's tokenizer: <|endoftext|> first, the chat and vision specials after the vocabulary.
BASE_SPECIALS = ["<|endoftext|>"]
ADDED_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS = 4 * (PATCH * MERGE) ** 2  # 4 image tokens
MAX_PIXELS = 32 * (PATCH * MERGE) ** 2  # 32 image tokens

TEXT_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
VISION_COMMON = dict(
    depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3
)
VISION_SIZES = {
    "qwen2_vl": dict(embed_dim=32, mlp_ratio=2, hidden_size=64, **VISION_COMMON),
    # window_size 56: 2x2 merged tokens per window, so even small images have several windows.
    "qwen2_5_vl": dict(
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        window_size=56,
        fullatt_block_indexes=[1],
        **VISION_COMMON,
    ),
}
CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


def build_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    return tiny_idefics3.byte_level_tokenizer(
        vocab_size,
        tiny_idefics3.corpus(),
        BASE_SPECIALS,
        ADDED_SPECIALS,
        CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def build_processor(model_type: str):
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    return qwen2_vl.image_processor_only(model_type, image_processor, build_tokenizer(), CHAT_TEMPLATE)


def build_config(model_type: str, tokenizer):
    config_class = CLASSES[model_type][0]
    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("im_end", "vision_start", "vision_end", "image_pad", "video_pad")
    }
    text = dict(
        vocab_size=len(tokenizer),
        eos_token_id=ids["im_end"],
        pad_token_id=ids["im_end"],
        bos_token_id=None,
        tie_word_embeddings=False,
        **TEXT_SIZES,
    )
    return config_class(
        text_config=text,
        vision_config=dict(VISION_SIZES[model_type]),
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )


def build_model(model_type: str, tokenizer, seed: int = 0, std: float = 0.2):
    import torch

    torch.manual_seed(seed)
    config = build_config(model_type, tokenizer)
    model = CLASSES[model_type][1](config)
    tiny_idefics3.reinit_weights(model, seed, std)
    eos = config.text_config.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model.eval()
