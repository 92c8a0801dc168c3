#!/usr/bin/env bash
# Installs what the deployment tests (tests/deploy, deploy/test-image.sh) need when missing:
# Debian's nginx, podman and debootstrap (apt, as root or through sudo), and the
# custom-resource validators from tests/deploy/package-lock.json (npm); kubernetes-validate
# comes with tests/requirements.txt. kubectl, whose kustomize renders the manifests, must
# already be installed: Debian does not package it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/sbin/nginx ] || ! command -v podman >/dev/null || [ ! -x /usr/sbin/debootstrap ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light podman debootstrap >/dev/null
fi
if [ ! -d tests/deploy/node_modules/@kubernetes-models/keda ]; then
  npm ci --prefix tests/deploy --no-audit --no-fund --silent
fi
command -v kubectl >/dev/null || { echo "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/) to render deploy/k8s" >&2; exit 1; }
