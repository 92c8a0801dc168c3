#!/usr/bin/env bash
# Installs what the deployment tests (tests/deploy) need when missing: Debian's nginx (apt, as
# root or through sudo), the custom-resource validators from tests/deploy/package-lock.json
# (npm) and kubernetes-validate (tests/requirements.txt, in .venv). kubectl, whose kustomize
# renders the manifests, must already be installed: Debian does not package it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null
fi
if [ ! -d tests/deploy/node_modules/@kubernetes-models/keda ]; then
  npm ci --prefix tests/deploy --no-audit --no-fund --silent
fi
command -v kubectl >/dev/null || { echo "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/) to render deploy/k8s" >&2; exit 1; }
