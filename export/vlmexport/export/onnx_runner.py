"""Run an exported package with onnxruntime: the Python twin of the Rust runtime.

Used for the export report and the tests. It only reads the package folder
(config.json, generation_config.json, onnx/variants.json, the graphs), so it
checks that the package is self-sufficient. The family module supplies the
one model-specific step: turning a prompt (ids + images) into inputs_embeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmexport.families import shared

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class DecodeResult:
    tokens: list[int]
    # logits[k] is the [vocab] row that chose tokens[k] (logits[0]: the prompt's last position).
    logits: list[np.ndarray] = field(default_factory=list)


class OnnxPackage:
    def __init__(self, package_dir: Path, variant: str = "fp32", threads: int = 2, providers=("CPUExecutionProvider",)):
        self.dir = Path(package_dir)
        self.config = json.loads((self.dir / "config.json").read_text())
        self.variants = json.loads((self.dir / "onnx" / "variants.json").read_text())
        self.variant = self.variants["variants"][variant]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {
            graph: ort.InferenceSession(str(self.dir / info["file"]), options, providers=list(providers))
            for graph, info in self.variant["graphs"].items()
        }
        decoder = self.sessions["decoder_model_merged"]
        self.past_names = [i.name for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in decoder.get_outputs() if o.name.startswith("present.")]
        # The older cache block (see families.shared): kept empty here, so the whole cache is the
        # past block that the graph concatenates at every step, as a plain decoder does.
        self.older_names = [i.name for i in decoder.get_inputs() if i.name.startswith("older_key_values.")]
        first_past = next(i for i in decoder.get_inputs() if i.name == self.past_names[0])
        self.kv_heads, self.head_dim = first_past.shape[1], first_past.shape[3]
        # The fused decoder (see families.shared) returns the buffers it is given: present's
        # length axis is past's.
        first_present = next(o for o in decoder.get_outputs() if o.name == self.present_names[0])
        self.in_place = isinstance(first_past.shape[2], str) and first_present.shape[2] == first_past.shape[2]
        self.kv_dtype = NP_DTYPES[self.variant["graphs"]["decoder_model_merged"]["kv_cache_dtype"]]

        from vlmexport import families  # local import: families imports torch lazily, this module must not

        self.family = families.family_for(self.config["model_type"])

    # --- the three graphs -------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def image_features(self, feeds: dict) -> np.ndarray:
        """vision_encoder on feeds named as its inputs (the family's vision_feeds)."""
        return self.sessions["vision_encoder"].run(None, feeds)[0]

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.in_place:
            return self.decode_in_place(feeds, past)
        feeds.update(zip(self.past_names, past))
        feeds.update(zip(self.older_names, self.empty_past(inputs_embeds.shape[0])))
        out = self.sessions["decoder_model_merged"].run(["logits", *self.present_names], feeds)
        return out[0], out[1:]

    def decode_in_place(self, feeds: dict, past: list[np.ndarray]):
        """The fused decoder, each present bound to its past buffer (ONNX Runtime then writes
        the new positions into it), the buffers doubled when the step needs more columns."""
        total = feeds["attention_mask"].shape[1]
        capacity = past[0].shape[2]
        if capacity < total:
            grown = max(total, 2 * capacity)
            past = [np.pad(b, ((0, 0), (0, 0), (0, grown - capacity), (0, 0))) for b in past]
        binding = self.sessions["decoder_model_merged"].io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits")
        buffers = [ort.OrtValue.ortvalue_from_numpy(b) for b in past]
        for past_name, present_name, buffer in zip(self.past_names, self.present_names, buffers):
            binding.bind_ortvalue_input(past_name, buffer)
            binding.bind_ortvalue_output(present_name, buffer)
        self.sessions["decoder_model_merged"].run_with_iobinding(binding)
        # Outputs come in the order they were bound; the OrtValues wrap the arrays' memory, so
        # the arrays now hold the written positions.
        return binding.get_outputs()[0].numpy(), past

    def empty_past(self, batch: int) -> list[np.ndarray]:
        # Past length 0: the first step uses the same graph as later ones.
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    # --- generation -------------------------------------------------------
    def greedy(
        self,
        input_ids: np.ndarray,
        images: dict | None = None,
        max_new_tokens: int = 24,
        eos_token_ids: list[int] | None = None,
        forced_tokens: list[int] | None = None,
        keep_logits: bool = True,
        on_token=None,
    ) -> DecodeResult:
        """Greedy decoding of one prompt (batch 1), with the KV cache.

        images: the family's image arrays from the processor (None for text only).

        forced_tokens: teacher forcing, feed these tokens instead of the argmax
        (used to compare variants' logits along the same token path).
        keep_logits=False keeps no logits (benchmarks).
        on_token(token) is called as each token is chosen (benchmarks time them).
        """
        eos = set(eos_token_ids if eos_token_ids is not None else self.eos_token_ids())
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        embeds = shared.prompt_embeddings(self.family, self, input_ids, images)
        mask = np.ones((1, input_ids.shape[1]), np.int64)
        positions, next_position = self.family.prompt_positions(self.config, input_ids, images)
        logits, past = self.decode(embeds, mask, positions, self.empty_past(1))
        result = DecodeResult(tokens=[])
        row = logits[0, -1]
        steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
        for step in range(steps):
            token = int(forced_tokens[step]) if forced_tokens is not None else int(np.argmax(row))
            result.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if keep_logits:
                result.logits.append(row)
            if forced_tokens is None and token in eos:
                break
            if step == steps - 1:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            positions = self.family.step_positions(next_position + step)
            logits, past = self.decode(self.embed(np.array([[token]])), mask, positions, past)
            row = logits[0, -1]
        return result

    def eos_token_ids(self) -> list[int]:
        path = self.dir / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        if eos is None:
            eos = self.config.get("text_config", {}).get("eos_token_id")
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]
