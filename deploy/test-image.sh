#!/usr/bin/env bash
# Builds the container image with podman and checks it as a user would run it: read-only root
# filesystem, non-root, the default model answering a chat completion with an image, exit 0 on
# SIGTERM. From the repository root:
#
#   bash deploy/test-image.sh [--stand-in-bases]
#
# --stand-in-bases: where Docker Hub cannot be reached (as on our CI machines), first make
# local stand-ins for the two base images from Debian's packages (debootstrap) and this machine's
# Rust toolchain, and build against them. Needs root, podman, debootstrap and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=localhost/vlmserve:cpu
build_args=()
podman_run=(podman run)

if [ "${1:-}" = "--stand-in-bases" ]; then
  # crun refuses a cgroup v2 hierarchy that still holds a controller beside v1 ("hybrid mode"),
  # and limits above the machine's own.
  if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
    for c in $(cat /sys/fs/cgroup/unified/cgroup.controllers); do
      mkdir -p "/sys/fs/cgroup/$c" && mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
    done
  fi
  limits=(--ulimit "nofile=$(ulimit -n):$(ulimit -Hn)" --ulimit nproc=4096:4096)
  podman_run+=("${limits[@]}")
  if ! podman image exists localhost/stand-in/debian:bookworm-slim; then
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    # This machine reaches the registries through a proxy with its own certificate authority.
    mkdir -p "$root/usr/local/share/ca-certificates" && cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import - localhost/stand-in/debian:bookworm-slim >/dev/null
    rm -rf "$root"
  fi
  if ! podman image exists localhost/stand-in/rust:slim-bookworm; then
    toolchain=$(rustc --print sysroot)
    ctx=$(mktemp -d)
    mkdir -p "$ctx/rust" && cp -a "$toolchain"/bin "$toolchain"/lib "$ctx/rust/"
    cat > "$ctx/Containerfile" <<'EOS'
FROM localhost/stand-in/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOS
    podman build "${limits[@]}" --network=host -t localhost/stand-in/rust:slim-bookworm "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
  build_args=(--network=host "${limits[@]}"
    --build-arg RUST_IMAGE=localhost/stand-in/rust:slim-bookworm
    --build-arg RUNTIME_IMAGE=localhost/stand-in/debian:bookworm-slim)
fi

started=$(date +%s)
podman build "${build_args[@]}" -f deploy/Containerfile -t "$tag" .
echo "image built in $(( $(date +%s) - started )) s: $(podman image inspect "$tag" --format '{{.Size}}') bytes"

name=vlmserve-image-test
podman rm -f "$name" >/dev/null 2>&1 || true
"${podman_run[@]}" -d --name "$name" --read-only --network=host --cap-drop=ALL \
  --security-opt=no-new-privileges "$tag" serve --host 127.0.0.1 --port 18080 >/dev/null
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 120); do
  curl -fsS http://127.0.0.1:18080/ready >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS http://127.0.0.1:18080/ready
echo
[ "$(podman exec "$name" id -u)" = 10001 ] || { echo "the server does not run as uid 10001" >&2; exit 1; }
image=$(base64 -w0 tests/fixtures/scenes/red-circle.png)
answer=$(curl -fsS http://127.0.0.1:18080/v1/chat/completions -H 'content-type: application/json' -d "{
  \"model\": \"shapes-vlm\", \"max_tokens\": 16, \"messages\": [{\"role\": \"user\", \"content\": [
    {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,$image\"}},
    {\"type\": \"text\", \"text\": \"What color is the circle?\"}]}]}")
echo "$answer"
echo "$answer" | grep -Eq '"content":" ?red"' || { echo "unexpected answer" >&2; exit 1; }
podman stop --time 30 "$name" >/dev/null
code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
podman logs "$name" 2>&1 | tail -3
[ "$code" = 0 ] || { echo "exit code $code after SIGTERM" >&2; exit 1; }
echo "image check passed: ready, answered, exit 0 on SIGTERM"
