#!/usr/bin/env bash
# The prepared GPU check: vlmserve's CUDA path measured and proven on a GPU host in one run.
#
#   bash scripts/gpu-check.sh pack            here: build, strip and compress what travels (.gpu-carry/)
#   bash scripts/gpu-check.sh bench-model     on the GPU host, in an early transfer: start building
#                                             the benchmark model in the background
#   bash scripts/gpu-check.sh ort-python      on the GPU host, in an early transfer: unpack
#                                             onnxruntime-gpu's Python package (.gpu-carry-ort/)
#   bash scripts/gpu-check.sh run             on the GPU host, with unpack.sh's exports (call 5 below):
#                                             every stage below, results under $OUT
#   bash scripts/gpu-check.sh run --cpu-dry-run   here: the same stages on the CPU provider with
#                                             small sizes, so that a device run does not fail on a typo
#
# Stages of `run` (each in its own time limit; one failing does not stop the next):
#   parity   the carried parity and batching test binaries with every graph on CUDA
#            (greedy FP32 token-exact against PyTorch, FP16 bounded, batched == single stream)
#   smoke    `vlmserve serve` on the default model with providers = [{ kind = "cuda" }], one
#            chat completion about tests/fixtures/scenes/red-circle.png
#   compare  bench/compare.py --cuda: S1, 128 new tokens, vlmserve FP32 and FP16 against PyTorch
#            CUDA FP16 and the Python onnxruntime CUDA loop (left out where onnxruntime has no
#            CUDA provider)
#   fused    bench/fused_attention_trial.py --cuda: one FP16 decode step of the package's decoder
#            against a GroupQueryAttention decoder (and that one as a CUDA graph), the cache in
#            device memory, at 100 and 1150 cached positions, 1 and 32 rows (FP16: the op has
#            no FP32 kernel on CUDA)
#   load     bench/load.py --cuda at 1, 8 and 32 streams
#   tensorrt the TensorRT provider once, where libnvinfer.so.10 can be loaded
# VLMSERVE_GPU_STAGES=compare,load (say) runs only those.
# The GPU host has no Rust and no network: binaries travel stripped and xz-compressed, Python
# packages missing there as wheels (.whl/), ONNX Runtime's GPU build as ../shared/gpu parts.
#
# The calls, each within 30 s of the last (an idle host goes back, and all it holds with it);
# this order took 614 s of device time in each of two runs on 2026-12-04 (docs/benchmarks.md).
# One call may run 600 s at most: the second run split call 5 in two, the first with
# VLMSERVE_GPU_STAGES=parity,smoke,bench-model,compare (379 s), the next fused,load (59 s).
#   here     bash scripts/gpu-check.sh pack && bash ../shared/gpu/prepare-ort-gpu.sh 50
#            git rm -r -q --cached models tests && printf '/models/\n/tests/\n' >> .git/info/exclude
#            (the transfers then carry 1 MB of tree instead of 31 MB of their 64 MiB)
#   call 1   carry .gpu/part4 .whl:  mkdir -p ~/ort-gpu/pieces && cp .gpu/part4/* ~/ort-gpu/pieces/
#            && bash scripts/gpu-check.sh bench-model
#   call 2   carry .gpu/part1 .gpu-carry-ort:  cp .gpu/part1/* ~/ort-gpu/pieces/ && bash scripts/gpu-check.sh ort-python
#   call 3   carry .gpu/part2:  cp .gpu/part2/* ~/ort-gpu/pieces/
#   call 4   carry .gpu/part3 .gpu/unpack.sh:  cp .gpu/part3/* ~/ort-gpu/pieces/ && bash .gpu/unpack.sh > ~/ort-gpu/env.sh
#   here     git reset -q && sed -i '/^\/models\/$/d;/^\/tests\/$/d' .git/info/exclude
#   call 5   carry .gpu-carry:  source ~/ort-gpu/env.sh && bash scripts/gpu-check.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARRY=$REPO/.gpu-carry
BENCH_DIR=${VLMSERVE_GPU_BENCH_DIR:-$HOME/vlm-bench}
MODEL_DIR=$BENCH_DIR/smolvlm-256m-shaped
SITE=/tmp/vlmserve-site
ORT_PYTHON=/tmp/vlmserve-ort-python
OUT=${OUT:-$REPO/target/gpu-check}
TEST_BINARIES="parity batching"
# Which stages `run` runs (a rerun may name fewer).
STAGES=${VLMSERVE_GPU_STAGES:-parity,smoke,bench-model,compare,fused,load,tensorrt}

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

# Stage NAME LIMIT_S COMMAND...: runs the command (a function of this script too) in a shell of
# its own, its output in $OUT/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  local start=$SECONDS
  log "$name: start"
  export -f log parity smoke wait_bench_model bench_model python_site tensorrt fused
  export REPO CARRY BENCH_DIR MODEL_DIR SITE OUT TEST_BINARIES TEST_BIN_DIR BENCH_IMAGE PYTHONPATH
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - start)) s"
  tail -n 15 "$OUT/$name.log" | sed "s/^/  $name | /" | tee -a "$OUT/summary.txt"
  return 0
}

# The newest build of an integration-test binary (cargo names it NAME-HASH).
test_binary() {
  ls -t "$REPO"/target/release/deps/"$1"-* | grep -v '\.d$' | head -1
}

pack() {
  set -e
  cargo build --release
  cargo test --release --no-run
  mkdir -p "$CARRY"
  # Stripped (no debug info) and compressed: 120 MB -> 4 MB for the server.
  strip -o "$CARRY/vlmserve" target/release/vlmserve
  for name in $TEST_BINARIES; do
    strip -o "$CARRY/$name" "$(test_binary "$name")"
  done
  (cd "$CARRY" && xz -T0 -6 -f vlmserve $TEST_BINARIES)
  # Wheels of what the export needs at the versions it is pinned to, where the GPU image differs.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    transformers==5.23.0 onnxconverter-common==1.16.0 num2words==0.5.14
  # onnxruntime-gpu's Python package without the libraries that the ../shared/gpu parts carry;
  # a folder of its own, since it travels in an earlier transfer than the binaries.
  mkdir -p "$CARRY-ort"
  if [ ! -s "$CARRY-ort/ort-python.tar.xz" ]; then
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$tmp" onnxruntime-gpu==1.31.1
    (cd "$tmp" && unzip -q ./*.whl 'onnxruntime/*' 'onnxruntime_gpu-*.dist-info/*' \
      -x 'onnxruntime/capi/libonnxruntime_providers_cuda.so' 'onnxruntime/capi/libonnxruntime.so.*' \
      'onnxruntime/capi/libonnxruntime_providers_tensorrt.so' \
      && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -T0 -6 > "$CARRY-ort/ort-python.tar.xz")
    rm -rf "$tmp"
  fi
  du -h "$CARRY"/* "$CARRY-ort"/* .whl/*
}

python_site() {
  mkdir -p "$SITE"
  # Once per host: a background build may be importing from it.
  if [ ! -d "$SITE/transformers" ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  export PYTHONPATH=$SITE
}

bench_model() {
  python_site
  mkdir -p "$BENCH_DIR"
  rm -rf "$BENCH_DIR/export" "$BENCH_DIR/done"
  # A copy of the exporter: the working tree may be laid anew by the next transfer.
  cp -r "$REPO/export" "$BENCH_DIR/export"
  PYTHONPATH=$BENCH_DIR/export:$PYTHONPATH setsid nohup bash -c "python3 -m vlmexport.fixtures.bench_model \
    --out '$MODEL_DIR' --precisions fp32,fp16 --packages package > '$BENCH_DIR/build.log' 2>&1; \
    echo \$? > '$BENCH_DIR/done'" > /dev/null 2>&1 &
  echo "building the benchmark model in the background: $BENCH_DIR/build.log"
}

# Waits for the background build (or builds here when none was started).
wait_bench_model() {
  if [ ! -d "$BENCH_DIR/export" ]; then
    [ -d "$MODEL_DIR/package" ] && echo "using the benchmark model in $MODEL_DIR" && return 0
    bench_model
  fi
  while [ ! -f "$BENCH_DIR/done" ]; do sleep 2; done
  cat "$BENCH_DIR/build.log"
  return "$(cat "$BENCH_DIR/done")"
}

unpack_binaries() {
  mkdir -p target/release /tmp/vlmserve-tests
  xz -d -c "$CARRY/vlmserve.xz" > target/release/vlmserve
  chmod +x target/release/vlmserve
  for name in $TEST_BINARIES; do
    xz -d -c "$CARRY/$name.xz" > "/tmp/vlmserve-tests/$name"
    chmod +x "/tmp/vlmserve-tests/$name"
  done
}

# onnxruntime-gpu's Python package (unpacked by `ort-python` in an earlier transfer), its CUDA
# provider linked from the unpacked parts.
ort_python() {
  mkdir -p "$ORT_PYTHON"
  tar -C "$ORT_PYTHON" -xJf "$CARRY-ort/ort-python.tar.xz"
}

python_onnxruntime_gpu() {
  [ -d "$ORT_PYTHON/onnxruntime" ] && [ -n "${ORT_DYLIB_PATH:-}" ] || return 0
  local lib
  lib=$(dirname "$ORT_DYLIB_PATH")
  ln -sf "$lib"/libonnxruntime_providers_cuda.so "$ORT_PYTHON/onnxruntime/capi/"
  ln -sf "$lib"/libonnxruntime.so.* "$ORT_PYTHON/onnxruntime/capi/"
  export PYTHONPATH=$ORT_PYTHON:$PYTHONPATH
}

parity() {
  local providers=$1
  for name in $TEST_BINARIES; do
    echo "== $name"
    VLMSERVE_REPO=$REPO VLMSERVE_TEST_PROVIDERS=$providers "$TEST_BIN_DIR/$name" --test-threads 1 || return 1
  done
}

smoke() {
  local kind=$1 config=$OUT/smoke.toml port=18080
  cat > "$config" <<EOF
[[models]]
name = "shapes-vlm"
path = "$REPO/models/shapes-vlm/package"
providers = [{ kind = "$kind" }]
[server]
host = "127.0.0.1"
port = $port
EOF
  target/release/vlmserve serve --config "$config" > "$OUT/smoke-server.log" 2>&1 &
  local server=$!
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break
    sleep 0.5
  done
  local image
  image=$(base64 -w0 tests/fixtures/scenes/red-circle.png)
  curl -sS "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' -d @- > "$OUT/smoke.json" <<EOF
{"model": "shapes-vlm", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
 {"type": "image_url", "image_url": {"url": "data:image/png;base64,$image"}},
 {"type": "text", "text": "What color is the circle?"}]}]}
EOF
  curl -sS "http://127.0.0.1:$port/metrics" | grep -E '^vlmserve_(requests|tokens)' | head -20
  kill "$server"
  wait "$server"
  cat "$OUT/smoke.json"
  echo
  python3 -c "import json, sys; a = json.load(open(sys.argv[1]))['choices'][0]['message']['content']; print('answer:', repr(a)); sys.exit(0 if 'red' in a else 1)" "$OUT/smoke.json"
}

fused() {
  local cuda=$1 steps=$2
  for batch in 1 32; do
    python3 bench/fused_attention_trial.py --package "$MODEL_DIR/package" --contexts 100,1150 --precisions fp16 \
      --batch "$batch" --steps "$steps" $cuda || return 1
  done
}

tensorrt() {
  if ! python3 -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2> /dev/null; then
    echo "skipped: libnvinfer.so.10 (TensorRT 10, pip tensorrt-cu13-libs) is not on this host"
    return 0
  fi
  local config=$OUT/tensorrt.toml
  cat > "$config" <<EOF
[[models]]
name = "bench"
path = "$MODEL_DIR/package"
providers = [{ kind = "tensorrt", engine_cache = "$BENCH_DIR/trt-cache" }, { kind = "cuda" }]
EOF
  time target/release/vlmserve bench --model bench --config "$config" --image "$BENCH_IMAGE" --no-split \
    --new-tokens 32 --runs 1 --warmup 0 --json
}

run() {
  local dry=${1:-}
  mkdir -p "$OUT"
  : > "$OUT/summary.txt"
  local kind=cuda cuda=--cuda peer_precision=fp16 new_tokens=128 runs=3 clients=1,8,32 requests=2 fused_steps=30
  if [ "$dry" = --cpu-dry-run ]; then
    kind=cpu cuda="" peer_precision=fp32 new_tokens=4 runs=1 clients=1,2 requests=1 fused_steps=2
    BENCH_DIR=${VLMSERVE_GPU_BENCH_DIR:-$REPO/bench/models}
    MODEL_DIR=$BENCH_DIR/smolvlm-256m-shaped
    TEST_BIN_DIR=$(mktemp -d)
    for name in $TEST_BINARIES; do
      ln -s "$(test_binary "$name")" "$TEST_BIN_DIR/$name"
    done
    PYTHON_BIN=$REPO/.venv/bin
    export PATH=$PYTHON_BIN:$PATH
  else
    TEST_BIN_DIR=/tmp/vlmserve-tests
    unpack_binaries
    nvidia-smi > "$OUT/env.txt" 2>&1
  fi
  python_site
  python_onnxruntime_gpu
  {
    echo "ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-}"
    python3 -c "import sys, torch, transformers, onnxruntime as o; print(sys.version); print('torch', torch.__version__, torch.cuda.is_available()); print('transformers', transformers.__version__); print('onnxruntime', o.__version__, o.get_available_providers())"
  } >> "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  BENCH_IMAGE=$BENCH_DIR/scene-512.png
  stage parity 240 parity "[{\"kind\": \"$kind\"}]"
  stage smoke 90 smoke "$kind"
  stage bench-model 420 wait_bench_model
  local peers=vlmserve,pytorch
  if [ -z "$dry" ] && python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    peers=vlmserve,onnx_loop,pytorch
  fi
  stage compare 300 python3 bench/compare.py $cuda --peer-precision "$peer_precision" --peers "$peers" \
    --model-dir "$MODEL_DIR" --image "$BENCH_IMAGE" --new-tokens "$new_tokens" --runs "$runs" --rounds 1 \
    --scenarios S1 --precisions fp32,fp16 --out "$OUT/benchmarks-gpu.md"
  stage fused 200 fused "$cuda${cuda:+ --cuda-graph}" "$fused_steps"
  stage load 240 python3 bench/load.py $cuda --package "$MODEL_DIR/package" --precision fp16 --clients "$clients" \
    --requests "$requests" --max-tokens "$new_tokens" --max-batch-size 32 --out "$OUT/benchmarks-gpu.md"
  [ -z "$dry" ] && stage tensorrt 120 tensorrt
  log "done in $SECONDS s"
}

case "${1:-}" in
  pack) pack ;;
  bench-model) bench_model ;;
  ort-python) ort_python ;;
  run) run "${2:-}" ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
