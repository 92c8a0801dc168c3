"""Idefics3 family: Idefics3 and SmolVLM (SigLIP-style vision tower, pixel-shuffle
connector, Llama text model).

Graphs (see export/README.md for the package contract):
  vision_encoder        pixel_values [n,3,H,W] f32, pixel_attention_mask [n,H,W] bool
                        -> image_features [n, tokens_per_image, text_hidden]
  embed_tokens          input_ids [b,s] i64 -> inputs_embeds [b,s,hidden]
  decoder_model_merged  inputs_embeds, attention_mask [b,past+s], position_ids [b,s],
                        past_key_values.{i}.key/value [b,kv_heads,past,head_dim]
                        -> logits [b,s,vocab], present.{i}.key/value [b,kv_heads,past+s,head_dim]

The runtime merges image features into the prompt embeddings itself: the k-th
<image> token's embedding is replaced by row k of the flattened features
(the order masked_scatter uses in transformers).
"""

from __future__ import annotations

import numpy as np

NAME = "idefics3"
MODEL_TYPES = ("idefics3", "smolvlm")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")

# Question asked about reference_image() in the export report.
REFERENCE_PROMPT = "Describe this image."


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
def _modules():
    import torch
    from torch import nn
    from transformers import DynamicCache

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

    class EmbedTokens(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.embed_tokens = model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class Decoder(nn.Module):
        """Text model + LM head with an explicit KV cache (past length may be 0)."""

        def __init__(self, model):
            super().__init__()
            self.text_model = model.model.text_model
            self.lm_head = model.lm_head
            self.text_config = model.config.text_config

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.text_config)
            out = self.text_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (self.lm_head(out.last_hidden_state), *present)

    return torch, VisionEncoder, EmbedTokens, Decoder


def text_dims(config) -> dict:
    text = config.text_config
    heads = text.num_attention_heads
    return dict(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
    )


def graph_specs(model) -> list:
    """GraphSpecs for the three graphs, with dummy inputs and dynamic axes."""
    from torch.export import Dim

    from onnx_graph import GraphSpec

    torch, VisionEncoder, EmbedTokens, Decoder = _modules()
    dims = text_dims(model.config)
    vision = model.config.vision_config
    size = vision.image_size

    # Example sizes are >= 2 so the exporter does not specialise them to 1.
    n_tiles, batch, seq, past = 2, 2, 3, 5
    pixel_values = torch.randn(n_tiles, 3, size, size)
    pixel_mask = torch.ones(n_tiles, size, size, dtype=torch.bool)
    tiles = Dim("num_images", min=1)
    vision_spec = GraphSpec(
        name="vision_encoder",
        module=VisionEncoder(model),
        args=(pixel_values, pixel_mask),
        input_names=["pixel_values", "pixel_attention_mask"],
        output_names=["image_features"],
        # H and W stay static (= vision image_size): every tile the image
        # processor produces has exactly that size.
        dynamic_shapes={"pixel_values": {0: tiles}, "pixel_attention_mask": {0: tiles}},
    )

    b, s = Dim("batch_size"), Dim("sequence_length")
    ids = torch.randint(0, dims["vocab"], (batch, seq))
    embed_spec = GraphSpec(
        name="embed_tokens",
        module=EmbedTokens(model),
        args=(ids,),
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_shapes={"input_ids": {0: b, 1: s}},
    )

    p, total = Dim("past_sequence_length", min=0), Dim("total_sequence_length")
    kv_shape = (batch, dims["kv_heads"], past, dims["head_dim"])
    past_kv = [torch.randn(kv_shape) for _ in range(2 * dims["layers"])]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(dims["layers"]) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(dims["layers"]) for kv in ("key", "value")]
    decoder_spec = GraphSpec(
        name="decoder_model_merged",
        module=Decoder(model),
        args=(
            torch.randn(batch, seq, dims["hidden"]),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(),
            past_kv,
        ),
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes={
            "inputs_embeds": {0: b, 1: s},
            "attention_mask": {0: b, 1: total},
            "position_ids": {0: b, 1: s},
            "past": [{0: b, 2: p}] * len(past_kv),
        },
        output_dim_names={name: {2: "total_sequence_length"} for name in present_names},
    )
    return [vision_spec, embed_spec, decoder_spec]


# --- reference inputs and PyTorch side of the parity checks ---------------------
def reference_image():
    """A deterministic synthetic scene (no files, no network)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 72), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 10, 44, 46), fill=(200, 30, 40))
    draw.rectangle((52, 20, 88, 60), fill=(30, 90, 200))
    draw.line((0, 70, 95, 40), fill=(20, 150, 60), width=3)
    return image


def reference_inputs(processor) -> dict:
    """Processor outputs (numpy) for one image + a short question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[reference_image()], return_tensors="np")
    return {
        "input_ids": inputs["input_ids"],
        "pixel_values": inputs["pixel_values"].astype(np.float32),
        "pixel_attention_mask": inputs["pixel_attention_mask"].astype(bool),
    }


def torch_image_features(model, pixel_values, pixel_attention_mask) -> np.ndarray:
    """transformers' own image features, [tiles*tokens, hidden]."""
    import torch

    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=torch.from_numpy(pixel_values), pixel_attention_mask=torch.from_numpy(pixel_attention_mask)
        )
    return torch.cat(list(out.pooler_output), dim=0).numpy()


def torch_path_logits(model, input_ids, pixel_values, pixel_attention_mask, tokens) -> np.ndarray:
    """PyTorch logits along a token path, [s + len(tokens) - 1, vocab].

    Prefill logits for every prompt position, then one row per fed token
    (tokens[:-1]) through the KV cache, as generate() does. Not one
    full-sequence pass: a generated <image> token must stay a plain token
    embedding, while a full pass would try to merge image features into it.
    """
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixel_values)
        kwargs["pixel_attention_mask"] = torch.from_numpy(pixel_attention_mask)
    rows = []
    with torch.no_grad():
        out = model(**kwargs)
        rows.append(out.logits[0])
        length = ids.shape[1]
        for token in tokens[:-1]:
            length += 1
            out = model(
                input_ids=torch.tensor([[token]]),
                attention_mask=torch.ones(1, length, dtype=torch.long),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            rows.append(out.logits[0])
    return torch.cat(rows).numpy()


def torch_greedy(model, input_ids, pixel_values=None, pixel_attention_mask=None, max_new_tokens=24) -> list[int]:
    """model.generate(do_sample=False): the new tokens only."""
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixel_values)
        kwargs["pixel_attention_mask"] = torch.from_numpy(pixel_attention_mask)
    with torch.no_grad():
        out = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids.shape[1] :].tolist()


# --- runtime side: prompt -> inputs_embeds ------------------------------------
def prompt_embeddings(package, input_ids, pixel_values, pixel_attention_mask) -> np.ndarray:
    """Token embeddings with each <image> token replaced by the next image-feature row."""
    embeds = package.embed(input_ids)
    image_token_id = package.config["image_token_id"]
    slots = input_ids[0] == image_token_id
    if pixel_values is None:
        if slots.any():
            raise ValueError("prompt has <image> tokens but no pixel_values")
        return embeds
    pv = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    mask = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:])
    features = package.image_features(pv, mask).reshape(-1, embeds.shape[-1])
    if features.shape[0] != slots.sum():
        raise ValueError(f"{slots.sum()} <image> tokens but {features.shape[0]} image feature rows")
    embeds[0, slots] = features
    return embeds


# --- --optimize support ---------------------------------------------------------
def optimizer_settings(config: dict) -> dict:
    """onnxruntime.transformers optimizer (model_type, num_heads, hidden_size) per graph."""
    text, vision = config["text_config"], config["vision_config"]
    return {
        "vision_encoder": ("vit", vision["num_attention_heads"], vision["hidden_size"]),
        "embed_tokens": None,  # a single Gather: nothing to fuse
        "decoder_model_merged": ("gpt2", text["num_attention_heads"], text["hidden_size"]),
    }


def sample_feeds(config: dict, graph: str, seed: int = 0) -> dict:
    """Small valid inputs for one graph (past length > 0 for the decoder)."""
    rng = np.random.default_rng(seed)
    text, vision = config["text_config"], config["vision_config"]
    if graph == "vision_encoder":
        size = vision["image_size"]
        mask = np.ones((2, size, size), bool)
        mask[1, size // 2 :, :] = False  # one partly padded tile
        return {"pixel_values": rng.standard_normal((2, 3, size, size)).astype(np.float32), "pixel_attention_mask": mask}
    if graph == "embed_tokens":
        return {"input_ids": rng.integers(0, text["vocab_size"], (1, 5))}
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    past, seq = 4, 3
    feeds = {
        "inputs_embeds": rng.standard_normal((1, seq, text["hidden_size"])).astype(np.float32),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    for i in range(text["num_hidden_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32)
    return feeds
