#!/usr/bin/env bash
# Runs every test from a fresh machine with only Rust and Python 3: installs ONNX Runtime's
# library, the Python environment (.venv), Chromium and playwright-core when missing, then the
# lints (rustfmt, ruff, clippy with warnings as errors), the Python export tests, the Rust
# tests, the OpenAI-client tests against the built server, the deployment tests (manifests,
# failover behind nginx), the browser test of the question page (screenshots and the failover
# figures in target/test-artifacts/), and the container image built and run with podman.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
bash scripts/setup-browser.sh
bash scripts/setup-deploy.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, onnxruntime, openai, pytest, ruff, kubernetes_validate, vlmexport" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r export/requirements.txt -r tests/requirements.txt
  .venv/bin/python -m pip install -q -e export
fi
cargo fmt --check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
cargo clippy --release --all-targets -- -D warnings
.venv/bin/python -m pytest -q export/tests
cargo test --release
# The official OpenAI client against the binary cargo just built.
.venv/bin/python -m pytest -q tests/openai_client
# A candidate version whose every generation fails is rolled back by the error gate.
.venv/bin/python -m pytest -q tests/rollout
# The Kubernetes manifests against their schemas; three replicas behind nginx failing over.
.venv/bin/python -m pytest -q tests/deploy
# The question page in headless Chromium against the same binary.
VLMSERVE_BIN="$PWD/target/release/vlmserve" npm test --prefix tests/browser
# The container image, built with podman from local stand-ins for its base images (CI machines
# cannot reach Docker Hub), run read-only: ready, answering, exit 0 on SIGTERM.
bash deploy/test-image.sh --stand-in-bases
