#!/usr/bin/env python3
"""Two builds of vlmserve, or two packages of one model, against each other on the same
question, alternating.

    python3 bench/ab.py --a /tmp/base/target/release/vlmserve --b target/release/vlmserve \\
        --rounds 4 -- --model bench/models/smolvlm-256m-shaped/package-optimized --no-split --new-tokens 64
    python3 bench/ab.py --a target/release/vlmserve --a-model bench/models/smolvlm-256m-shaped/package-optimized \\
        --b-model bench/models/smolvlm-256m-shaped/package-fused --rounds 4 -- --no-split --new-tokens 64

Each round runs `vlmserve bench --json` (the arguments after `--`, then each side's
`--model` when given) once per side, in reverse order every other round, so the shared
machine's drift falls on both alike. `--b` defaults to `--a`'s build. Prints each side's
medians over rounds of time to first token, decode tokens/s and peak RSS, and the ratios
b / a; each side's greedy tokens must be equal in every round, and where the sides' differ
(packages with different weights) it says after how many. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def run(binary: str, bench_args: list[str]) -> dict:
    out = subprocess.run([binary, "bench", "--json", *bench_args], check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return {
        "ttft_s": report["time_to_first_token_s"]["median"],
        "decode_tok_s": report["decode_tokens_per_second"]["median"],
        "peak_rss_mb": report["peak_rss_bytes"] / 2**20,
        "tokens": report["token_ids"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="the reference build")
    parser.add_argument("--b", help="the build measured against it (default: --a)")
    parser.add_argument("--a-model", help="the reference package (`--model` of a's runs)")
    parser.add_argument("--b-model", help="the package measured against it (`--model` of b's runs)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then `vlmserve bench` arguments")
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    sides = {
        name: (binary, bench_args + (["--model", model] if model else []))
        for name, binary, model in (("a", args.a, args.a_model), ("b", args.b or args.a, args.b_model))
    }
    results: dict[str, list[dict]] = {"a": [], "b": []}
    for i in range(args.rounds):
        order = ["a", "b"] if i % 2 == 0 else ["b", "a"]
        for name in order:
            r = run(*sides[name])
            results[name].append(r)
            print(f"round {i + 1} {name}: ttft {r['ttft_s']:.3f} s, decode {r['decode_tok_s']:.1f} tok/s", flush=True)
    tokens = {}
    for name, rs in results.items():
        if any(r["tokens"] != rs[0]["tokens"] for r in rs):
            sys.exit(f"{name}'s greedy tokens differ between rounds")
        tokens[name] = rs[0]["tokens"]
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("ttft_s", "decode_tok_s", "peak_rss_mb")}
        for n, rs in results.items()
    }
    print("| side | time to first token (s) | decode tok/s | peak RSS (MB) |")
    print("|---|---|---|---|")
    for name in ("a", "b"):
        m = med[name]
        print(f"| {name} | {m['ttft_s']:.3f} | {m['decode_tok_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    a, b = med["a"], med["b"]
    print(
        f"| b / a | {b['ttft_s'] / a['ttft_s']:.2f}x | {b['decode_tok_s'] / a['decode_tok_s']:.2f}x "
        f"| {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x |"
    )
    if tokens["a"] == tokens["b"]:
        print(f"Greedy tokens equal in every run ({len(tokens['a'])} tokens).")
    else:
        common = next((i for i, (x, y) in enumerate(zip(tokens["a"], tokens["b"])) if x != y), len(tokens["a"]))
        print(
            f"Greedy tokens: b's differ from a's after {common} of {len(tokens['a'])} (each side's equal in every run)."
        )


if __name__ == "__main__":
    main()
