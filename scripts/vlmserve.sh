#!/usr/bin/env bash
# Builds vlmserve (release) after installing ONNX Runtime if needed, then runs it with the
# given arguments, from the repository root so the default configuration's paths resolve.
# A first build compiles every dependency (about 6 minutes on 2 cores) and shows cargo's
# progress; later ones take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
cargo build --release
exec target/release/vlmserve "$@"
