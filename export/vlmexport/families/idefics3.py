"""Idefics3 family: Idefics3 and SmolVLM (SigLIP-style vision tower, pixel-shuffle
connector, Llama text model).

Graphs (see export/README.md for the package contract):
  vision_encoder        pixel_values [n,3,H,W] f32, pixel_attention_mask [n,H,W] bool
                        -> image_features [n, tokens_per_image, text_hidden]
  embed_tokens          input_ids [b,s] i64 -> inputs_embeds [b,s,hidden]
  decoder_model_merged  inputs_embeds, attention_mask [b,past+s], position_ids [b,s],
                        past_key_values.{i}.key/value [b,kv_heads,past,head_dim]
                        -> logits [b,1,vocab], present.{i}.key/value [b,kv_heads,past+s,head_dim]

The runtime merges image features into the prompt embeddings itself: the k-th
<image> token's embedding is replaced by row k of the flattened features
(the order masked_scatter uses in transformers).
"""

from __future__ import annotations

import numpy as np

from . import shared

NAME = "idefics3"
MODEL_TYPES = ("idefics3", "smolvlm")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask")


# --- loading -------------------------------------------------------------
def load(src: str):
    """Model (fp32, eager attention) and processor from a hub id or a local folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # Eager attention: the exported graphs then contain plain MatMul/Softmax
    # that every ONNX Runtime execution provider runs, and the reference
    # PyTorch numbers come from the same attention code.
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(src)
    return model.eval(), processor


# --- graph wrappers --------------------------------------------------------
def _vision_module():
    from torch import nn

    class VisionEncoder(nn.Module):
        """Vision tower + connector (pixel shuffle + projection) for a stack of tiles.

        Unlike Idefics3Model.get_image_features, this does not drop all-zero
        "padding images" (a data-dependent shape); the runtime only feeds real
        tiles. The patch mask is derived from pixel_attention_mask exactly as
        transformers does (a patch is valid if any of its pixels is).
        """

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.model.vision_model
            self.connector = model.model.connector
            self.patch_size = model.config.vision_config.patch_size

        def forward(self, pixel_values, pixel_attention_mask):
            n, _, height, width = pixel_values.shape
            ps = self.patch_size
            rows, cols = height // ps, width // ps
            # Same as transformers' mask.unfold(1, ps, ps).unfold(2, ps, ps).sum((-1, -2)) > 0,
            # written as a reshape so it exports with a dynamic number of tiles.
            patches = pixel_attention_mask[:, : rows * ps, : cols * ps].reshape(n, rows, ps, cols, ps)
            patch_attention_mask = patches.sum(dim=(2, 4)) > 0
            hidden = self.vision_model(
                pixel_values=pixel_values, patch_attention_mask=patch_attention_mask
            ).last_hidden_state
            return self.connector(hidden)

    return VisionEncoder


def graph_specs(model, fused_attention: bool = False) -> list:
    """GraphSpecs for the three graphs, with dummy inputs and dynamic axes (fused_attention: the decoder
    on GroupQueryAttention, shared.py)."""
    import torch
    from torch.export import Dim

    from vlmexport.export.onnx_graph import GraphSpec

    size = model.config.vision_config.image_size
    # Example sizes are >= 2 so the exporter does not specialise them to 1.
    n_tiles = 2
    pixel_values = torch.randn(n_tiles, 3, size, size)
    pixel_mask = torch.ones(n_tiles, size, size, dtype=torch.bool)
    tiles = Dim("num_images", min=1)
    vision_spec = GraphSpec(
        name="vision_encoder",
        module=_vision_module()(model),
        args=(pixel_values, pixel_mask),
        input_names=["pixel_values", "pixel_attention_mask"],
        output_names=["image_features"],
        # H and W stay static (= vision image_size): every tile the image
        # processor produces has exactly that size.
        dynamic_shapes={"pixel_values": {0: tiles}, "pixel_attention_mask": {0: tiles}},
    )
    text = model.model.text_model
    specs = shared.graph_specs(
        text.embed_tokens, text, model.lm_head, model.config.text_config, fused_attention=fused_attention
    )
    return [vision_spec, *specs]


# --- reference inputs and PyTorch side of the parity checks ---------------------
def processor_images(inputs) -> dict | None:
    """The image arrays of a processor output (the `images` dict the other functions take)."""
    return shared.image_arrays(inputs, dict(zip(IMAGE_KEYS, (np.float32, bool))))


def reference_arrays(model, input_ids, images) -> dict:
    """What a fixture case records beside the prompt: the processor's image arrays."""
    return dict(images or {})


def vision_feeds(images: dict, config: dict | None = None) -> dict:
    """vision_encoder feeds: every image's tiles stacked."""
    pv, pam = images["pixel_values"], images["pixel_attention_mask"]
    return {"pixel_values": pv.reshape(-1, *pv.shape[-3:]), "pixel_attention_mask": pam.reshape(-1, *pam.shape[-2:])}


def _torch_kwargs(input_ids, images) -> dict:
    import torch

    kwargs = {"input_ids": torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))}
    for name, array in (images or {}).items():
        kwargs[name] = torch.from_numpy(array)
    return kwargs


def torch_image_features(model, images: dict) -> np.ndarray:
    """transformers' own image features, [tiles*tokens, hidden]."""
    import torch

    with torch.no_grad():
        out = model.get_image_features(**{k: v for k, v in _torch_kwargs([0], images).items() if k != "input_ids"})
    return torch.cat(list(out.pooler_output), dim=0).numpy()


def torch_path_logits(model, input_ids, images, tokens) -> np.ndarray:
    return shared.torch_path_logits(model, _torch_kwargs(input_ids, images), tokens)


def torch_greedy(model, input_ids, images=None, max_new_tokens=24) -> list[int]:
    return shared.torch_greedy(model, _torch_kwargs(input_ids, images), max_new_tokens)


# --- runtime side: prompt -> inputs_embeds and positions ---------------------------


def prompt_positions(config: dict, input_ids, images) -> tuple[np.ndarray, int]:
    """1-D positions [1, s] and the first decode position."""
    length = input_ids.shape[1]
    return np.arange(length, dtype=np.int64)[None], length


def step_positions(position: int) -> np.ndarray:
    return np.array([[position]], np.int64)


# --- --optimize support ---------------------------------------------------------
def optimizer_settings(config: dict) -> dict:
    """onnxruntime.transformers optimizer (model_type, num_heads, hidden_size) per graph."""
    text, vision = config["text_config"], config["vision_config"]
    return {
        "vision_encoder": ("vit", vision["num_attention_heads"], vision["hidden_size"]),
        "embed_tokens": None,  # a single Gather: nothing to fuse
        "decoder_model_merged": ("gpt2", text["num_attention_heads"], text["hidden_size"]),
    }


def sample_feeds(config: dict, graph: str, seed: int = 0, fused_attention: bool = False) -> dict:
    """Small valid inputs for one graph (past length > 0 for the decoder)."""
    rng = np.random.default_rng(seed)
    if graph != "vision_encoder":
        return shared.sample_feeds(config["text_config"], graph, rng, fused_attention=fused_attention)
    size = config["vision_config"]["image_size"]
    mask = np.ones((2, size, size), bool)
    mask[1, size // 2 :, :] = False  # one partly padded tile
    return {"pixel_values": rng.standard_normal((2, 3, size, size)).astype(np.float32), "pixel_attention_mask": mask}
