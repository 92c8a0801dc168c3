#!/usr/bin/env python3
"""The benchmark checkpoint as OpenVINO IR, the way a SmolVLM user gets it: optimum-intel's
`optimum-cli export openvino`, FP32 weights and INT8 weights (`--weight-format int8`, nncf's
per-channel weight compression). Runs in bench/.venv-openvino (bench/openvino-requirements.txt).

    bench/.venv-openvino/bin/python bench/openvino_export.py --model-dir bench/models/smolvlm-256m-shaped

writes MODEL_DIR/openvino-fp32 and MODEL_DIR/openvino-int8 from MODEL_DIR/checkpoint.
optimum-intel 2.2.0 exports with transformers <= 4.57, which does not read the tokenizer
settings transformers 5 saves: the export works on a copy whose tokenizer_config.json names
GPT2TokenizerFast and drops the list-valued extra_special_tokens (the tokens stay in
tokenizer.json, so the ids are the same), and whose config.json states rotary embeddings as
transformers 4 reads them (`rope_theta`, and `rope_scaling` for Qwen2-VL's M-RoPE sections)
instead of transformers 5's `rope_parameters`, which 4.57 ignores: it would export the
default theta (10000) instead of the model's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def rope_for_transformers_4(config: dict) -> None:
    """`rope_parameters` of config and its sub-configs as transformers 4's keys, in place."""
    for sub in [config, *(v for v in config.values() if isinstance(v, dict) and "model_type" in v)]:
        rope = sub.pop("rope_parameters", None)
        if rope is None or rope.get("rope_type") not in ("default", None):
            # Other kinds (the vision tower's axial rotary) have no transformers 4 key to move to.
            if rope is not None:
                sub["rope_parameters"] = rope
            continue
        sub["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            sub["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}


def for_transformers_4(checkpoint: Path, into: Path) -> None:
    shutil.copytree(checkpoint, into, dirs_exist_ok=True)
    path = into / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "GPT2TokenizerFast"
    for key in ("extra_special_tokens", "backend"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=1))
    path = into / "config.json"
    config = json.loads(path.read_text())
    rope_for_transformers_4(config)
    path.write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("bench/models/smolvlm-256m-shaped"))
    parser.add_argument("--weights", default="fp32,int8", help="which IRs to write")
    args = parser.parse_args()
    cli = Path(sys.executable).parent / "optimum-cli"
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "checkpoint"
        for_transformers_4(args.model_dir / "checkpoint", source)
        for weights in args.weights.split(","):
            out = args.model_dir / f"openvino-{weights}"
            cmd = [str(cli), "export", "openvino", "--model", str(source), "--task", "image-text-to-text"]
            subprocess.run([*cmd, "--weight-format", weights, str(out)], check=True, capture_output=True)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
