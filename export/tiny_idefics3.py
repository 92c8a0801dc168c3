"""Build the tiny, seeded Idefics3 checkpoint used by the test fixtures.

Everything here uses the real transformers classes (Idefics3Config,
Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3ImageProcessorPil,
PreTrainedTokenizerFast) so that the fixture exercises exactly the code paths a
real SmolVLM checkpoint goes through; only the sizes and the weights are fake.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import PILImageResampling
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

# SmolVLM-256M-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Trained-in specials get the lowest ids (as <|endoftext|>=0, <|im_start|>=1 in SmolVLM);
# the image/utterance specials are appended after the BPE vocab, as in SmolVLM (ids 49152+).
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>"]
ADDED_SPECIALS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)

TEXT_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
VISION_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=8,
)
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (64 // 8) ** 2 // SCALE_FACTOR**2  # 16 tokens per tile

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink", "brown", "cyan"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "dot", "ellipse", "hexagon", "cross"]
PLACES = ["left", "right", "top", "bottom", "centre", "corner", "middle", "edge"]
SIZES = ["small", "large", "tiny", "big", "thin", "wide", "tall", "short"]
TEMPLATES = [
    "The image shows a {size} {colour} {shape} on the {place}.",
    "There is a {colour} {shape} near the {place} of the picture.",
    "A {size} {shape} is drawn in {colour}.",
    "What colour is the {shape}? It is {colour}.",
    "In this photo, the {shape} at the {place} looks {size} and {colour}.",
    "Describe the image: a {colour} background with a {size} {shape}.",
    "I can see {count} {colour} {shape}s in the image.",
    "The {place} of the image has a {colour} {shape} and a {colour2} {shape2}.",
]
COUNTS = ["one", "two", "three", "four", "five", "many", "several", "no"]


def corpus(n_sentences: int = 600, seed: int = 1234) -> list[str]:
    """A few hundred deterministic sentences about shapes, colours and images."""
    rng = random.Random(seed)
    out = []
    for i in range(n_sentences):
        tpl = TEMPLATES[i % len(TEMPLATES)]
        out.append(
            tpl.format(
                size=rng.choice(SIZES),
                colour=rng.choice(COLOURS),
                colour2=rng.choice(COLOURS),
                shape=rng.choice(SHAPES),
                shape2=rng.choice(SHAPES),
                place=rng.choice(PLACES),
                count=rng.choice(COUNTS),
            )
        )
    # Chat words and digits so prompts tokenize into sensible pieces.
    out += ["User: Assistant: What is in the image? Compare these two images."] * 20
    out += [" ".join(str(d) for d in range(100))] * 5
    return out


def build_tokenizer(vocab_size: int = 700, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (like SmolVLM's GPT-2 style tokenizer) trained on `texts` (default: the embedded corpus)."""
    return byte_level_tokenizer(
        vocab_size,
        corpus() if texts is None else texts,
        BASE_SPECIALS,
        ADDED_SPECIALS,
        CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def byte_level_tokenizer(
    vocab_size, texts, base_specials, added_specials, chat_template, **special_tokens
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, `base_specials` first (lowest ids), `added_specials` after the vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=added_specials, model_max_length=2048, **special_tokens
    )
    fast.chat_template = chat_template
    return fast


def build_image_processor(**overrides) -> Idefics3ImageProcessorPil:
    settings = dict(
        do_image_splitting=True,
        size={"longest_edge": 256},
        max_image_size={"longest_edge": 64},
        resample=PILImageResampling.LANCZOS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Idefics3ImageProcessorPil(**(settings | overrides))


def build_processor(tokenizer=None, image_processor=None, image_seq_len: int = IMAGE_SEQ_LEN) -> Idefics3Processor:
    """The fixture's processor; other models (train_default.py) pass their own parts."""
    return Idefics3Processor(
        image_processor=image_processor or build_image_processor(),
        tokenizer=tokenizer or build_tokenizer(),
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer, text_sizes=TEXT_SIZES, vision_sizes=VISION_SIZES, scale_factor=SCALE_FACTOR
) -> Idefics3Config:
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eou,
        pad_token_id=eou,
        tie_word_embeddings=False,
        **text_sizes,
    )
    return Idefics3Config(
        text_config=text,
        vision_config=dict(vision_sizes),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        pad_token_id=eou,
    )


@torch.no_grad()
def reinit_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every weight from one seeded generator.

    We do not rely on transformers' _init_weights: its order and defaults may
    change between versions, and its 0.02 std makes a tiny random model emit
    the same token forever. A larger std gives varied, well-separated logits.
    Norm weights get 1 + noise (not exactly 1) so they are not a no-op.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))


def build_model(
    tokenizer, seed: int = 0, std: float | None = 0.2, config: Idefics3Config | None = None
) -> Idefics3ForConditionalGeneration:
    """std=None keeps transformers' own initialisation (for a model that is then trained)."""
    torch.manual_seed(seed)
    config = config or build_config(tokenizer)
    model = Idefics3ForConditionalGeneration(config)
    if std is not None:
        reinit_weights(model, seed, std)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model.eval()
