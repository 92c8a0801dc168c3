"""Qwen2-VL family: Qwen2-VL and Qwen2.5-VL (dynamic-resolution ViT with 2-D rotary
positions, 2x2 patch merger, Qwen2 text model with multimodal rotary positions).

Graphs (see export/README.md for the package contract):
  vision_encoder        pixel_values [patches, C*T*P*P] f32 (the processor's flattened
                        patches, images concatenated), vision_position_ids [patches, 2] i64
                        (row, column of each patch), attention_segments [patches] i64 (the
                        frame each patch belongs to: patches attend within their frame);
                        Qwen2.5-VL adds window_patch_index [patches] i64 (the patch order
                        of window attention) and window_segments [patches] i64 (the window
                        of each patch in that order)
                        -> image_features [patches / merge^2, text_hidden]
  embed_tokens, decoder_model_merged as shared.py, position_ids [3, b, s].

The vision inputs besides the pixels are what transformers computes from
image_grid_thw with Python loops (transformers.vision_utils, which itself
precomputes them outside traced graphs); the runtime computes the same from
each image's grid. Attention is masked by segment instead of split by
cu_seqlens, which gives the same softmax over each segment.
"""

from __future__ import annotations

import sys

import numpy as np

from . import shared

NAME = "qwen2_vl"
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def load(src: str):
    """Model (fp32, eager attention) and processor from a hub id or a local folder."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_processor = AutoImageProcessor.from_pretrained(src, backend="pil")
    return model.eval(), image_processor_only(
        model.config.model_type, image_processor, tokenizer, tokenizer.chat_template
    )


def image_processor_only(model_type: str, image_processor, tokenizer, chat_template):
    """The family's processor without its video processor.

    transformers' Qwen2-VL processors require a video processor, which needs
    torchvision, and torchvision has no release for the pinned torch. Images
    never touch it, so we build the processor class (same name, so saved files
    name the real class) with only its image processor and tokenizer.
    """
    import transformers

    base = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}[model_type]
    cls = type(base.__name__, (base,), {"get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"])})
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def windowed(config) -> bool:
    """Qwen2.5-VL's vision tower alternates window and full attention."""
    vision = config["vision_config"] if isinstance(config, dict) else config.vision_config.to_dict()
    return "fullatt_block_indexes" in vision and "window_size" in vision


# --- graph wrappers --------------------------------------------------------
def _vision_module():
    import torch
    from torch import nn

    def segment_bias(segments):
        """Additive mask [n, n]: 0 within a segment, -inf across. Built once per graph and added
        to every layer's scores: the same softmax as filling them with -inf (x + 0 is x), without
        the Where over [heads, n, n] per layer that ONNX Runtime runs slowly
        (docs/benchmarks.md)."""
        same = segments[:, None] == segments[None, :]
        return torch.zeros(same.shape).masked_fill(~same, float("-inf"))

    def attention(attn, x, cos, sin, bias, rotary):
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, head_dim]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        scores = scores + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(0, 1).reshape(n, -1)
        return attn.proj(out)

    class VisionEncoder(nn.Module):
        """The vision tower with segment-masked attention; same weights and math as transformers'."""

        def __init__(self, model):
            super().__init__()
            self.visual = model.model.visual
            self.full_blocks = set(getattr(self.visual, "fullatt_block_indexes", range(len(self.visual.blocks))))
            # The rotary function of the tower's own modeling file (Qwen2-VL's or Qwen2.5-VL's).
            self.rotary = sys.modules[type(self.visual).__module__].apply_rotary_pos_emb_vision

        def forward(
            self, pixel_values, vision_position_ids, attention_segments, window_patch_index=None, window_segments=None
        ):
            visual = self.visual
            hidden = visual.patch_embed(pixel_values)
            cos, sin = visual.rotary_pos_emb(hidden, vision_position_ids)
            if window_patch_index is not None:
                # Window order, as permute_input_for_window_attn (per merge unit, so per patch here).
                hidden, cos, sin = hidden[window_patch_index], cos[window_patch_index], sin[window_patch_index]
                attention_segments = attention_segments[window_patch_index]
                window_mask = segment_bias(window_segments)
            full_mask = segment_bias(attention_segments)
            for i, block in enumerate(visual.blocks):
                mask = full_mask if i in self.full_blocks else window_mask
                hidden = hidden + attention(block.attn, block.norm1(hidden), cos, sin, mask, self.rotary)
                hidden = hidden + block.mlp(block.norm2(hidden))
            if window_patch_index is not None:
                # Back to patch order before merging: the merger reads groups of merge^2 rows.
                hidden = hidden[torch.argsort(window_patch_index)]
            return visual.merger(hidden)

    return VisionEncoder


def graph_specs(model, fused_attention: bool = False) -> list:
    import torch
    from torch.export import Dim

    from vlmexport.export.onnx_graph import GraphSpec

    vision = model.config.vision_config
    # Two images (grids 1x4x4 and 1x4x8) so segments and windows are exercised.
    grids = np.array([[1, 4, 4], [1, 4, 8]], np.int64)
    config = model.config.to_dict()
    feeds = vision_feeds({"pixel_values": None, "image_grid_thw": grids}, config)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    patches = int(grids.prod(-1).sum())
    args = [torch.randn(patches, patch_dim)] + [torch.from_numpy(feeds[name]) for name in _aux_inputs(config)]
    n = Dim("num_patches", min=4)
    names = ["pixel_values", *_aux_inputs(config)]
    vision_spec = GraphSpec(
        name="vision_encoder",
        module=_vision_module()(model),
        args=tuple(args),
        input_names=names,
        output_names=["image_features"],
        dynamic_shapes={name: {0: n} for name in names},
    )
    text = model.model.language_model
    config = model.config.text_config
    specs = shared.graph_specs(
        text.embed_tokens, text, model.lm_head, config, position_axes=3, fused_attention=fused_attention
    )
    return [vision_spec, *specs]


def _aux_inputs(config: dict) -> list[str]:
    names = ["vision_position_ids", "attention_segments"]
    return names + (["window_patch_index", "window_segments"] if windowed(config) else [])


# --- vision inputs from image_grid_thw (transformers.vision_utils) -----------------
def vision_feeds(images: dict, config: dict) -> dict:
    """vision_encoder feeds for the processor's pixel_values and image_grid_thw."""
    import torch
    from transformers import vision_utils

    vision = config["vision_config"]
    merge = vision["spatial_merge_size"]
    grids = torch.from_numpy(np.asarray(images["image_grid_thw"], np.int64))
    feeds = {
        "vision_position_ids": vision_utils.get_vision_position_ids(grids, merge).numpy().astype(np.int64),
        "attention_segments": _segments(vision_utils.get_vision_cu_seqlens(grids).numpy()),
    }
    if images.get("pixel_values") is not None:
        feeds["pixel_values"] = np.asarray(images["pixel_values"], np.float32)
    if windowed(config):
        window_index, cu_window = vision_utils.get_vision_window_index(
            grids, merge, vision["window_size"], vision["patch_size"]
        )
        unit = merge * merge
        index = window_index.numpy()[:, None] * unit + np.arange(unit)
        feeds["window_patch_index"] = index.reshape(-1).astype(np.int64)
        feeds["window_segments"] = _segments(cu_window.numpy())
    return feeds


def _segments(cu_seqlens: np.ndarray) -> np.ndarray:
    """Segment id per position from cumulative boundaries [0, a, a+b, ...]."""
    return np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens)).astype(np.int64)


# --- reference inputs and PyTorch side of the parity checks ---------------------
def processor_images(inputs) -> dict | None:
    return shared.image_arrays(inputs, dict(zip(IMAGE_KEYS, (np.float32, np.int64))))


def reference_arrays(model, input_ids, images) -> dict:
    """What a fixture case records beside the prompt: get_rope_index's positions and, with
    images, the processor's arrays, the vision-encoder inputs and PyTorch's image features."""
    arrays = {"position_ids": torch_rope_index(model, input_ids, images)}
    if images is not None:
        arrays.update(images)
        arrays.update(vision_feeds(images, model.config.to_dict()))
        arrays["image_features"] = torch_image_features(model, images)
    return arrays


def _torch_kwargs(model, input_ids, images) -> dict:
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
    kwargs = {"input_ids": ids}
    if images is not None:
        kwargs.update({name: torch.from_numpy(images[name]) for name in IMAGE_KEYS})
        # What the processor returns beside input_ids: 1 marks image tokens.
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).to(torch.int32)
    return kwargs


def torch_image_features(model, images: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=torch.from_numpy(images["pixel_values"]),
            image_grid_thw=torch.from_numpy(images["image_grid_thw"]),
        )
    return torch.cat(list(out.pooler_output), dim=0).numpy()


def torch_path_logits(model, input_ids, images, tokens) -> np.ndarray:
    # Decode steps continue after the prompt's largest position, as generate() does with rope_deltas.
    start = int(torch_rope_index(model, input_ids, images).max()) + 1
    kwargs = _torch_kwargs(model, input_ids, images)
    return shared.torch_path_logits(model, kwargs, tokens, lambda k: step_positions(start + k))


def torch_greedy(model, input_ids, images=None, max_new_tokens=24) -> list[int]:
    return shared.torch_greedy(model, _torch_kwargs(model, input_ids, images), max_new_tokens)


def torch_rope_index(model, input_ids, images) -> np.ndarray:
    """transformers' get_rope_index: the prompt's [3, 1, s] positions (text only: 0..s on all three)."""

    kwargs = _torch_kwargs(model, input_ids, images)
    if images is None:
        length = kwargs["input_ids"].shape[1]
        return np.broadcast_to(np.arange(length, dtype=np.int64), (3, 1, length)).copy()
    positions, _ = model.model.get_rope_index(
        kwargs["input_ids"], mm_token_type_ids=kwargs["mm_token_type_ids"], image_grid_thw=kwargs["image_grid_thw"]
    )
    return positions.numpy()


# --- runtime side: prompt -> inputs_embeds and positions ---------------------------


def prompt_positions(config: dict, input_ids, images) -> tuple[np.ndarray, int]:
    """get_rope_index in numpy: text runs count on, each image is a t x h x w grid at the text position."""
    merge = config["vision_config"]["spatial_merge_size"]
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == config["image_token_id"]
    grids = iter([] if images is None else np.asarray(images["image_grid_thw"]).tolist())
    columns, position, i = [], 0, 0
    while i < len(ids):
        if not is_image[i]:
            columns.append(np.full((3, 1), position))
            position, i = position + 1, i + 1
            continue
        t, h, w = next(grids)
        h, w = h // merge, w // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        columns.append(np.stack([tt, hh, ww]).reshape(3, -1) + position)
        position += max(h, w)
        i += t * h * w
    positions = np.concatenate(columns, axis=1).astype(np.int64)[:, None, :]
    return positions, int(positions.max()) + 1


def step_positions(position: int) -> np.ndarray:
    return np.full((3, 1, 1), position, np.int64)


# --- --optimize support ---------------------------------------------------------
def optimizer_settings(config: dict) -> dict:
    text = config["text_config"]
    return {
        "vision_encoder": None,  # segment-masked attention: no fusion pattern matches it
        "embed_tokens": None,
        "decoder_model_merged": ("gpt2", text["num_attention_heads"], text["hidden_size"]),
    }


def sample_feeds(config: dict, graph: str, seed: int = 0, fused_attention: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    if graph != "vision_encoder":
        return shared.sample_feeds(config["text_config"], graph, rng, position_axes=3, fused_attention=fused_attention)
    vision = config["vision_config"]
    grids = np.array([[1, 4, 4]], np.int64)
    patch_dim = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    pixels = rng.standard_normal((16, patch_dim)).astype(np.float32)
    return vision_feeds({"pixel_values": pixels, "image_grid_thw": grids}, config)
