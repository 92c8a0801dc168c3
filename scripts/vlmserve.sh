#!/usr/bin/env bash
# Builds vlmserve (release) after installing ONNX Runtime if needed, then runs it with the
# given arguments, from the repository root so the default configuration's paths resolve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
cargo build --release --quiet
exec target/release/vlmserve "$@"
