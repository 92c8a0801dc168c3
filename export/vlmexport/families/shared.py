"""What every family shares: the two text graphs (embed_tokens and
decoder_model_merged), PyTorch's greedy tokens and logit paths, and the export
report's reference input.

  embed_tokens          input_ids [b,s] i64 -> inputs_embeds [b,s,hidden]
  decoder_model_merged  inputs_embeds, attention_mask [b,older+past+s], position_ids
                        ([b,s], or [3,b,s] for M-RoPE), older_key_values.{i}.key/value
                        [b,kv_heads,older,head_dim], past_key_values.{i}.key/value
                        [b,kv_heads,past,head_dim] -> logits [b,1,vocab],
                        present.{i}.key/value [b,kv_heads,past+s,head_dim]

Logits are the last position's only: generation reads nothing else, and the LM head over
every prompt position is a large share of a prefill's arithmetic, its [s, vocab] output the
prefill's largest tensor (docs/benchmarks.md). Packages exported before return [b,s,vocab];
runtimes read the last row of either.

The cache comes in two blocks per layer. Attention reads both; only the recent
block (past) is concatenated with the new positions and returned as present,
so a runtime that keeps a long older block and moves positions into it now
and then does not copy the whole cache at every step. Feeding empty older
blocks (length 0) gives the usual one-block decoder.

A family passes its text model (a transformers decoder without LM head), the
LM head and the text config; position ids keep whatever layout the text model
takes, so the same wrapper serves 1-D rotary and multimodal rotary decoders.

With fused attention (`export --attention fused`) the decoder runs ONNX Runtime's
com.microsoft.GroupQueryAttention instead, and the cache is one buffer per layer:

  decoder_model_merged  inputs_embeds, attention_mask [b,total], position_ids,
                        past_key_values.{i}.key/value [b,kv_heads,capacity,head_dim]
                        -> logits, present.{i}.key/value [b,kv_heads,capacity,head_dim]

The buffer's first total - s columns hold the cache (left-padded, as the mask says); the
op writes the new positions at columns total - s .. total and returns the buffer. A
runtime that binds present to the same memory as past (ONNX Runtime then shares it) copies
nothing per step; `capacity` >= total is the runtime's choice. Rotary stays transformers'
own (applied before the op), so 1-D and multimodal rotary export alike.
"""

from __future__ import annotations

import numpy as np


def text_dims(text) -> dict:
    heads = text.num_attention_heads
    return dict(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
    )


GROUPED_ATTENTION = "vlmserve_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, older_cache=None, **kwargs):
    """Eager attention without repeat_kv: the query heads that share a key/value head are
    stacked along the query axis, so one matrix product per key/value head gives the whole
    group's scores, and each key/value head is broadcast over its group for the weighted sum
    of values. Equal to transformers' eager attention up to float rounding (export/tests/test_attention.py);
    the exported graph then reads each cached key/value head once per step instead of copying
    it for each of its query heads (an Expand per layer and step: with the cache's
    concatenation, a third of a batch-8 decode step in ONNX Runtime's profile).

    older_cache = (blocks, mask): blocks[layer] = (keys, values) of the layer's older cache
    block, read before key/value (the recent block and the new positions) under one softmax,
    never concatenated with them; mask is causal_mask() of the 2-D attention mask, over both
    blocks, and replaces attention_mask (transformers' assumes one cache length for every
    layer, and layers may split their cache at different columns).
    """
    import torch

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    older_keys, older_values = older_cache[0][module.layer_idx] if older_cache else (None, None)
    # Head h uses key/value head h // group (repeat_kv's order).
    stacked = query.reshape(batch, kv_heads, group * q_len, head_dim)
    weights = torch.matmul(stacked, key.transpose(2, 3))
    if older_keys is not None:
        weights = torch.cat([torch.matmul(stacked, older_keys.transpose(2, 3)), weights], -1)
        attention_mask = older_cache[1]
    # From here one query head at a time: [b, kv, group, q_len, keys]. The mask broadcasts over
    # the group, and each key/value head over its group in the product with the values
    # ([b, kv, 1, keys, head_dim]): a decode step's product is then one row per head, which
    # ONNX Runtime runs without packing the values, where the group's stacked rows made it
    # copy every cached value block first.
    weights = weights.view(batch, kv_heads, group, q_len, -1) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, None]
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if older_keys is None:
        output = torch.matmul(weights, value[:, :, None])
    else:
        older = older_keys.shape[2]
        output = torch.matmul(weights[..., :older], older_values[:, :, None])
        output = output + torch.matmul(weights[..., older:], value[:, :, None])
    output = output.view(batch, heads, q_len, head_dim)
    return output.transpose(1, 2).contiguous(), None


def causal_mask(padding, q_len: int, dtype):
    """The additive attention mask [b, 1, q_len, n] of q_len new positions at the end of the 2-D
    attention mask padding [b, n]: each sees the unpadded positions up to itself. Built once
    per step for every layer, wherever a layer splits its cache."""
    import torch

    total = padding.shape[1]
    causal = torch.arange(total)[None, :] <= torch.arange(total - q_len, total)[:, None]
    allowed = (padding != 0)[:, None, None, :] & causal
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


FUSED_ATTENTION = "vlmserve_fused"


def group_query_attention(query, key, value, past_key, past_value, total_length, bias, num_heads, scaling):
    """com.microsoft.GroupQueryAttention as the fused decoder uses it, in PyTorch: query [b,s,
    heads*d], key/value [b,s,kv*d] (rotary applied), past_key/value the buffers [b,kv,capacity,d]
    whose first total_length - s columns are the cache, bias [b,1,s,total_length] additive (the
    causal and padding mask). Returns (output [b,s,heads*d], present_key, present_value): the
    buffers with the new positions written at total_length - s .. total_length."""
    import torch

    batch, q_len, _ = query.shape
    kv_heads, head_dim = past_key.shape[1], past_key.shape[3]
    total = int(total_length)
    present = []
    for past, new in ((past_key, key), (past_value, value)):
        buffer = past.clone()
        buffer[:, :, total - q_len : total] = new.view(batch, q_len, kv_heads, head_dim).transpose(1, 2)
        present.append(buffer)
    group = num_heads // kv_heads
    keys, values = (b[:, :, :total].repeat_interleave(group, 1) for b in present)
    heads = query.view(batch, q_len, num_heads, head_dim).transpose(1, 2)
    weights = torch.matmul(heads, keys.transpose(2, 3)) * scaling + bias
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, values).transpose(1, 2).reshape(batch, q_len, num_heads * head_dim)
    return output, present[0], present[1]


def _gqa_op():
    """group_query_attention as a torch custom op (opaque to the exporter) and its ONNX
    translation, the contrib op; built once."""
    import torch

    if hasattr(torch.ops.vlmserve, "group_query_attention"):
        return torch.ops.vlmserve.group_query_attention
    # The schema is spelt out: this module's annotations are strings (__future__), which
    # custom_op cannot read.
    schema = (
        "(Tensor query, Tensor key, Tensor value, Tensor past_key, Tensor past_value, Tensor seqlens_k, "
        "Tensor total_length, Tensor bias, int num_heads, float scaling) -> (Tensor, Tensor, Tensor)"
    )

    @torch.library.custom_op("vlmserve::group_query_attention", mutates_args=(), schema=schema)
    def op(query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, scaling):
        return group_query_attention(query, key, value, past_key, past_value, total_length, bias, num_heads, scaling)

    @op.register_fake
    def _(query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, scaling):
        return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)

    return torch.ops.vlmserve.group_query_attention


def gqa_translation():
    """The exporter's translation of the custom op: one GroupQueryAttention node."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    # onnx knows no schema of ONNX Runtime's contrib ops: the inputs this graph uses, described
    # here (ONNX Runtime checks the node against its own schema when it loads the graph).
    optional = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    types = {"seqlens_k": "M", "total_sequence_length": "M"}
    inputs = [OpSchema.FormalParameter(name, types.get(name, "T")) for name in names]
    inputs += [OpSchema.FormalParameter(name, "T", param_option=optional) for name in ("cos_cache", "sin_cache")]
    inputs += [
        OpSchema.FormalParameter("position_ids", "P", param_option=optional),
        OpSchema.FormalParameter("attention_bias", "T", param_option=optional),
    ]
    schema = OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int32)"], ""),
            ("P", ["tensor(int64)"], ""),
        ],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
        ],
    )
    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def translate(query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, scaling):
        return gqa(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            None,
            None,
            None,
            bias,
            num_heads=num_heads,
            kv_num_heads=past_key.shape[1],
            scale=scaling,
            _outputs=3,
        )

    return {_gqa_op().default: translate}


def fused_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, cache_buffers=None, **kwargs):
    """The attention of the fused decoder: the layer's query and new key/value heads (rotary
    applied by transformers) into group_query_attention over the layer's buffers.
    cache_buffers = (buffers, seqlens_k, total_length, bias, present): buffers[layer] =
    (keys, values); the op's present buffers are appended to the list present."""
    buffers, seqlens_k, total_length, bias, present = cache_buffers
    batch, heads, q_len, head_dim = query.shape

    def packed(x):
        return x.transpose(1, 2).reshape(batch, q_len, -1)

    past_key, past_value = buffers[module.layer_idx]
    output, present_key, present_value = _gqa_op()(
        packed(query), packed(key), packed(value), past_key, past_value, seqlens_k, total_length, bias, heads, scaling
    )
    present += [present_key, present_value]
    return output.view(batch, q_len, heads, head_dim), None


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    for name, function in ((GROUPED_ATTENTION, grouped_attention), (FUSED_ATTENTION, fused_attention)):
        AttentionInterface.register(name, function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)


def _modules():
    from torch import nn
    from transformers import DynamicCache

    _register_grouped_attention()

    class EmbedTokens(nn.Module):
        def __init__(self, embed_tokens):
            super().__init__()
            self.embed_tokens = embed_tokens

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class Decoder(nn.Module):
        """Text model + LM head with an explicit KV cache in two blocks per layer (the module
        docstring); either may have length 0."""

        def __init__(self, text_model, lm_head, text_config):
            super().__init__()
            self.text_model = text_model
            self.lm_head = lm_head
            self.text_config = text_config

        def forward(self, inputs_embeds, attention_mask, position_ids, older, past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.text_config)
            # Attention takes its mask from here (grouped_attention), not transformers' 4-D one,
            # which assumes one cache length for every layer.
            mask = causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
            older_cache = (list(zip(older[0::2], older[1::2])), mask)
            out = self.text(GROUPED_ATTENTION, inputs_embeds, position_ids, cache, older_cache=older_cache)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (self.lm_head(out.last_hidden_state[:, -1:]), *present)

        def text(self, attention, inputs_embeds, position_ids, cache, **kwargs):
            """The text model run with the named attention function."""
            config = self.text_model.config
            eager, config._attn_implementation = config._attn_implementation, attention
            try:
                return self.text_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=None,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                    **kwargs,
                )
            finally:
                config._attn_implementation = eager

    class FusedDecoder(Decoder):
        """Text model + LM head over one cache buffer per layer, written by the fused op
        (the module docstring)."""

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            import torch

            batch, q_len = inputs_embeds.shape[:2]
            total = attention_mask.shape[1]
            # GroupQueryAttention's lengths: every row ends at the last column (left padding);
            # the bias masks what precedes each row.
            total_length = torch.full((), total, dtype=torch.int32)
            seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
            bias = causal_mask(attention_mask, q_len, inputs_embeds.dtype)
            present = []
            buffers = (list(zip(past[0::2], past[1::2])), seqlens_k, total_length, bias, present)
            out = self.text(FUSED_ATTENTION, inputs_embeds, position_ids, None, cache_buffers=buffers)
            return (self.lm_head(out.last_hidden_state[:, -1:]), *present)

    return EmbedTokens, Decoder, FusedDecoder


def graph_specs(
    embed_tokens, text_model, lm_head, text_config, position_axes: int = 0, fused_attention: bool = False
) -> list:
    """GraphSpecs of embed_tokens and decoder_model_merged (fused_attention: on GroupQueryAttention).

    position_axes=0 gives position_ids [b, s]; 3 gives [3, b, s] (M-RoPE).
    """
    import torch
    from torch.export import Dim

    from vlmexport.export.onnx_graph import GraphSpec

    EmbedTokens, Decoder, FusedDecoder = _modules()
    dims = text_dims(text_config)
    # Example sizes are >= 2 so the exporter does not specialise them to 1.
    batch, seq, past = 2, 3, 5
    b, s = Dim("batch_size"), Dim("sequence_length")
    ids = torch.randint(0, dims["vocab"], (batch, seq))
    embed_spec = GraphSpec(
        name="embed_tokens",
        module=EmbedTokens(embed_tokens),
        args=(ids,),
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_shapes={"input_ids": {0: b, 1: s}},
    )

    kv_shape = (batch, dims["kv_heads"], past, dims["head_dim"])
    past_names = [f"past_key_values.{i}.{kv}" for i in range(dims["layers"]) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(dims["layers"]) for kv in ("key", "value")]
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    position_dims = {0: b, 1: s}
    if position_axes:
        positions = positions.expand(position_axes, batch, seq).contiguous()
        position_dims = {1: b, 2: s}
    embeds = torch.randn(batch, seq, dims["hidden"])
    shared_dims = {
        "inputs_embeds": {0: b, 1: s},
        "attention_mask": {0: b, 1: Dim("total_sequence_length")},
        "position_ids": position_dims,
    }
    if fused_attention:
        capacity = Dim("cache_capacity")
        buffers = [torch.randn(kv_shape[:2] + (past + seq + 4,) + kv_shape[3:]) for _ in past_names]
        decoder_spec = GraphSpec(
            name="decoder_model_merged",
            module=FusedDecoder(text_model, lm_head, text_config),
            args=(embeds, torch.ones(batch, past + seq, dtype=torch.long), positions, buffers),
            input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes={**shared_dims, "past": [{0: b, 2: capacity} for _ in buffers]},
            output_dim_names={name: {2: "cache_capacity"} for name in present_names},
            translations=gqa_translation(),
        )
        return [embed_spec, decoder_spec]

    older = 4
    # Each layer may split its cache at its own column (a runtime moves one layer's recent
    # block into its older block per step), so every layer has its own lengths.
    layer_dims = [
        (Dim(f"older_sequence_length_{i}", min=0), Dim(f"past_sequence_length_{i}", min=0))
        for i in range(dims["layers"])
    ]
    past_kv = [torch.randn(kv_shape) for _ in past_names]
    older_kv = [torch.randn(kv_shape[:2] + (older,) + kv_shape[3:]) for _ in past_kv]
    older_names = [name.replace("past_key_values", "older_key_values") for name in past_names]
    decoder_spec = GraphSpec(
        name="decoder_model_merged",
        module=Decoder(text_model, lm_head, text_config),
        args=(embeds, torch.ones(batch, older + past + seq, dtype=torch.long), positions, older_kv, past_kv),
        input_names=["inputs_embeds", "attention_mask", "position_ids", *older_names, *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes={
            **shared_dims,
            "older": [{0: b, 2: o} for o, _ in layer_dims for _kv in range(2)],
            "past": [{0: b, 2: p} for _, p in layer_dims for _kv in range(2)],
        },
        output_dim_names={name: {2: f"present_sequence_length_{name.split('.')[1]}"} for name in present_names},
    )
    return [embed_spec, decoder_spec]


def sample_feeds(text: dict, graph: str, rng, position_axes: int = 0, fused_attention: bool = False) -> dict:
    """Small valid inputs for embed_tokens or the decoder (past length > 0), from config.json's text_config;
    fused_attention: the fused decoder's (one buffer per layer, 4 columns to spare)."""
    if graph == "embed_tokens":
        return {"input_ids": rng.integers(0, text["vocab_size"], (1, 5))}
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    older, past, seq = 2, 4, 3
    positions = np.arange(older + past, older + past + seq, dtype=np.int64)[None]
    if position_axes:
        positions = np.broadcast_to(positions, (position_axes, 1, seq)).copy()
    feeds = {
        "inputs_embeds": rng.standard_normal((1, seq, text["hidden_size"])).astype(np.float32),
        "attention_mask": np.ones((1, older + past + seq), np.int64),
        "position_ids": positions,
    }
    blocks = [("past", older + past + seq + 4)] if fused_attention else [("older", older), ("past", past)]
    for i in range(text["num_hidden_layers"]):
        for kv in ("key", "value"):
            for block, length in blocks:
                name = f"{block}_key_values.{i}.{kv}"
                feeds[name] = rng.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32)
    return feeds


def torch_path_logits(model, prompt_kwargs: dict, tokens, step_positions=None) -> np.ndarray:
    """PyTorch logits along a token path, [len(tokens), vocab]: the row that chose each token.

    The prompt's last position, then one row per fed token
    (tokens[:-1]) through the KV cache, as generate() does, with the model's
    own position handling. Not one full-sequence pass: a generated image token
    must stay a plain token embedding, while a full pass would try to merge
    image features into it. prompt_kwargs: the processor's tensors;
    step_positions(k): position_ids of the k-th fed token, for models whose
    forward cannot derive them from the attention mask alone.
    """
    import torch

    ids = prompt_kwargs["input_ids"]
    rows = []
    with torch.no_grad():
        out = model(**prompt_kwargs, attention_mask=torch.ones_like(ids), use_cache=True)
        rows.append(out.logits[0, -1:])
        length = ids.shape[1]
        for k, token in enumerate(tokens[:-1]):
            length += 1
            extra = {} if step_positions is None else {"position_ids": torch.from_numpy(step_positions(k))}
            out = model(
                input_ids=torch.tensor([[token]]),
                attention_mask=torch.ones(1, length, dtype=torch.long),
                past_key_values=out.past_key_values,
                use_cache=True,
                **extra,
            )
            rows.append(out.logits[0])
    return torch.cat(rows).numpy()


def torch_greedy(model, prompt_kwargs: dict, max_new_tokens: int) -> list[int]:
    """model.generate(do_sample=False) on the processor's tensors: the new tokens only."""
    import torch

    ids = prompt_kwargs["input_ids"]
    with torch.no_grad():
        out = model.generate(
            **prompt_kwargs, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
    return out[0, ids.shape[1] :].tolist()


# Question asked about reference_image() in the export report.
REFERENCE_PROMPT = "Describe this image."


def reference_image():
    """A deterministic synthetic scene (no files, no network)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 72), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 10, 44, 46), fill=(200, 30, 40))
    draw.rectangle((52, 20, 88, 60), fill=(30, 90, 200))
    draw.line((0, 70, 95, 40), fill=(20, 150, 60), width=3)
    return image


def reference_inputs(processor, processor_images) -> dict:
    """The export report's input: reference_image() and REFERENCE_PROMPT through the processor
    (numpy): input_ids and the family's images dict (processor_images of the output)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[reference_image()], return_tensors="np")
    return {"input_ids": inputs["input_ids"], "images": processor_images(inputs)}


def image_arrays(inputs, dtypes: dict) -> dict | None:
    """The image arrays of a processor output in the graphs' types (None without images)."""
    if inputs.get("pixel_values") is None:
        return None
    return {name: np.asarray(inputs[name]).astype(dtype) for name, dtype in dtypes.items()}


def prompt_embeddings(family, package, input_ids, images) -> np.ndarray:
    """Token embeddings with each image token replaced by the next image-feature row, the
    features from the package's vision encoder on the family's feeds."""
    features = None if images is None else package.image_features(family.vision_feeds(images, package.config))
    return merge_image_features(package.embed(input_ids), input_ids, package.config["image_token_id"], features)


def merge_image_features(embeds: np.ndarray, input_ids: np.ndarray, image_token_id: int, features) -> np.ndarray:
    """Each image token's embedding replaced by the next feature row (masked_scatter's order)."""
    slots = input_ids[0] == image_token_id
    if features is None:
        if slots.any():
            raise ValueError("prompt has image tokens but no images")
        return embeds
    features = features.reshape(-1, embeds.shape[-1])
    if features.shape[0] != slots.sum():
        raise ValueError(f"{slots.sum()} image tokens but {features.shape[0]} image feature rows")
    embeds[0, slots] = features
    return embeds
