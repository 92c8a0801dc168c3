"""The rollout gates on a real `vlmserve serve` with real HTTP clients.

- A candidate version built from the tiny fixture whose decoder fails at every decode step
  (loading and the one-token warm-up pass, so the server takes it), with clients that carry
  session keys: clients of the stable version never see an error, the candidate's lose their
  traffic within the window, and the reason is listed.
- The default model's FP32 package shadowed by itself (every greedy answer agrees) and by a
  copy whose decoder weights are shuffled (agreement falls below the gate, which takes its
  shadow share away) while clients are answered by the stable version."""

import base64
import contextlib
import hashlib
import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "idefics3-tiny"
BINARY = ROOT / "target" / "release" / "vlmserve"
MODEL = "idefics3-tiny"
WEIGHTS = {"stable": 70, "candidate": 30}
MIN_REQUESTS = 5


def fail_at_decode(package: Path) -> None:
    """Make the FP32 decoder fail whenever it is given a past: the first past key is reshaped
    to an empty shape (an error in ONNX Runtime unless the past is empty) and its sum, 0, is
    added to the logits, so the node cannot be pruned. Prefill (no past) still works."""
    path = package / "onnx" / "decoder_model_merged.onnx"
    model = onnx.load(path)
    graph = model.graph
    past = next(i.name for i in graph.input if i.name.endswith(".0.key"))
    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_before_fault"
    graph.initializer.append(helper.make_tensor("fault_empty_shape", TensorProto.INT64, [1], [0]))
    graph.node.extend(
        [
            helper.make_node("Reshape", [past, "fault_empty_shape"], ["fault_empty"], allowzero=1),
            helper.make_node("ReduceSum", ["fault_empty"], ["fault_zero"], keepdims=0),
            helper.make_node("Add", ["logits_before_fault", "fault_zero"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)


def version_for(key: str) -> str:
    """The version src/scheduler/router.rs gives `key` at WEIGHTS (weighted rendezvous hashing)."""

    def draw(label: str) -> float:
        digest = hashlib.sha256(key.encode() + b"\0" + label.encode()).digest()
        u = ((int.from_bytes(digest[:8], "little") >> 11) + 0.5) / 2**53
        return -math.log(u) / WEIGHTS[label]

    return min(WEIGHTS, key=draw)


HOST = {"Host": "localhost"}


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **HOST, **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


@contextlib.contextmanager
def serve(tmp_path: Path, models: str, rollout: str):
    """`vlmserve serve` on `models` (TOML entries) with the `[rollout]` settings, once ready."""
    assert BINARY.is_file(), "build it first: cargo build --release"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(
        f"""{models}
[server]
http_workers = 2
admin_token = "secret-token"

[scheduler]
prefix_cache_mb = 0

[rollout]
{rollout}
"""
    )
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--port", str(port), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if call(f"{url}/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def entry(name: str, version: str, path: Path, weight: int, shadow: int = 0) -> str:
    return (
        f'[[models]]\nname = "{name}"\nversion = "{version}"\nweight = {weight}\nshadow = {shadow}\n'
        f"path = {json.dumps(str(path))}\n\n"
    )


def listed_version(url: str, model: str, version: str) -> dict:
    _, _, listed = call(f"{url}/v1/models/{model}")
    return next(v for v in listed["versions"] if v["version"] == version)


def metrics(url: str) -> str:
    with urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=HOST)) as r:
        return r.read().decode()


@pytest.fixture
def server(tmp_path):
    """The fixture model as `stable`, and as a `candidate` that fails at every decode step
    (the faulty candidate must pass loading and warm-up, or the server would not start)."""
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE / "package", broken)
    fail_at_decode(broken)
    models = entry(MODEL, "stable", FIXTURE / "package", WEIGHTS["stable"]) + entry(
        MODEL, "candidate", broken, WEIGHTS["candidate"]
    )
    with serve(tmp_path, models, f"window_s = 60.0\nmin_requests = {MIN_REQUESTS}\ncheck_interval_s = 0.1") as url:
        yield url


def test_a_failing_candidate_is_rolled_back_by_the_error_gate(server):
    results = []  # (time, key, status, version header or None)
    lock = threading.Lock()
    stop = threading.Event()
    image = (FIXTURE / "images" / "one_image_0.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(image).decode()

    def client(n: int):
        i = 0
        while not stop.is_set():
            key = f"user-{n}-{i}"
            i += 1
            body = {
                "model": MODEL,
                "temperature": 0,
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "What?"},
                        ],
                    }
                ],
            }
            status, headers, answer = call(f"{server}/v1/chat/completions", body, {"x-session-id": key})
            version = {k.lower(): v for k, v in headers.items()}.get("x-vlmserve-model-version")
            with lock:
                results.append((time.monotonic(), key, status, version, answer))

    def rolled_back() -> dict | None:
        candidate = listed_version(server, MODEL, "candidate")
        return candidate if candidate["rollback"] else None

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        deadline = start + 60
        while (candidate := rolled_back()) is None:
            assert time.monotonic() < deadline, "the failing candidate was not rolled back within the window"
            time.sleep(0.05)
        rolled_at = time.monotonic()
        # Afterwards every client is answered by the stable version.
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()

    errors = [r for r in results if r[2] != 200]
    assert len(errors) >= MIN_REQUESTS, f"{len(errors)} errors before the gate judged"
    for _, key, status, _, answer in errors:
        assert version_for(key) == "candidate", f"a stable client saw an error: {key} {status} {answer}"
        assert status == 500 and answer["error"]["type"] == "server_error", answer
    # Before the rollback each key kept to its version; the candidate answered nothing.
    answered = [r for r in results if r[2] == 200]
    assert all(r[3] == "stable" for r in answered), [r[3] for r in answered if r[3] != "stable"][:3]
    assert all(version_for(r[1]) == "stable" for r in answered if r[0] < min(e[0] for e in errors))
    late = [r for r in results if r[0] > rolled_at + 1.0]
    assert len(late) >= 4 and all(r[2] == 200 and r[3] == "stable" for r in late), late[:3]
    moved = [r for r in late if version_for(r[1]) == "candidate"]
    assert moved, "some late clients had candidate keys and were answered by the stable version"

    assert candidate["rollback"]["gate"] == "errors", candidate
    assert "error rate 100.0%" in candidate["rollback"]["reason"], candidate
    assert candidate["weight"] == 0 and candidate["state"] == "ready", candidate
    assert f'vlmserve_rollbacks_total{{gate="errors",model="{MODEL}@candidate"}} 1' in metrics(server)
    first_error = min(r[0] for r in errors)
    print(
        f"\n{len(results)} requests, {len(errors)} failed on the candidate, rolled back "
        f"{rolled_at - first_error:.2f} s after its first error: {candidate['rollback']['reason']}"
    )


def wait_idle(url: str, names: list[str]) -> None:
    """Until none of `names` has a request in flight."""
    deadline = time.monotonic() + 60
    gauges = ("vlmserve_num_requests_waiting", "vlmserve_num_requests_running")
    while True:
        lines = metrics(url).splitlines()
        busy = [line for line in lines for name in names if line.startswith(gauges) and f'"{name}"' in line]
        if all(line.endswith(" 0") for line in busy):
            return
        assert time.monotonic() < deadline, busy
        time.sleep(0.02)


def scramble_decoder(package: Path) -> None:
    """Shuffle every float weight of the FP32 decoder (seeded): same shapes, another model."""
    path = package / "onnx" / "decoder_model_merged.onnx"
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    for i, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 1:
            shuffled = rng.permutation(values.ravel()).reshape(values.shape)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(shuffled, tensor.name))
    onnx.save(model, path)


def test_a_shadow_of_the_same_files_agrees_and_a_different_one_is_rolled_back(tmp_path):
    package = ROOT / "models" / "shapes-vlm" / "package"
    scrambled = tmp_path / "scrambled"
    shutil.copytree(package, scrambled)
    scramble_decoder(scrambled)
    model = "shapes-vlm"
    models = (
        entry(model, "stable", package, 100)
        + entry(model, "same", package, 0, shadow=100)
        + entry(model, "scrambled", scrambled, 0, shadow=100)
    )
    data = ROOT / "tests" / "fixtures" / "eval-small"
    items = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()[:20]]
    with serve(tmp_path, models, "min_requests = 10\ncheck_interval_s = 0.1") as url:
        for item in items:
            picture = base64.b64encode((data / item["image"]).read_bytes()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
                {"type": "text", "text": item["question"]},
            ]
            body = {
                "model": model,
                "temperature": 0,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": content}],
            }
            status, _, answer = call(f"{url}/v1/chat/completions", body)
            assert status == 200 and answer["system_fingerprint"] == "stable", answer
            # The shadows run at the lowest priority and drop copies while busy: let them finish.
            wait_idle(url, [f"{model}@same", f"{model}@scrambled"])
        deadline = time.monotonic() + 60
        while listed_version(url, model, "scrambled")["rollback"] is None:
            assert time.monotonic() < deadline, json.dumps(listed_version(url, model, "scrambled"))
            time.sleep(0.05)
        # Every copy the same files ran agreed.
        while (same := listed_version(url, model, "same"))["window"]["shadow_compared"] < len(items):
            assert time.monotonic() < deadline, same
            time.sleep(0.05)
        scrambled_listed = listed_version(url, model, "scrambled")
        text = metrics(url)
    assert same["window"]["shadow_agreement"] == 1.0 and same["rollback"] is None, same
    assert same["shadow"]["results"] == {"agreed": len(items)}, same
    assert scrambled_listed["rollback"]["gate"] == "shadow_agreement", scrambled_listed
    assert scrambled_listed["shadow"]["percent"] == 0, scrambled_listed
    window = scrambled_listed["window"]
    assert window["shadow_compared"] >= 10 and window["shadow_agreement"] < 0.9, window
    assert f'vlmserve_rollbacks_total{{gate="shadow_agreement",model="{model}@scrambled"}} 1' in text
    print(
        f"\nshadow agreement: same files {same['window']['shadow_agreement']:.0%} over "
        f"{same['window']['shadow_compared']}; shuffled decoder {window['shadow_agreement']:.0%} over "
        f"{window['shadow_compared']}: {scrambled_listed['rollback']['reason']}"
    )
