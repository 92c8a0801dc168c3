"""Three `vlmserve serve` replicas behind nginx configured as deploy/nginx/vlmserve.conf; clients
stream through it while one replica gets SIGTERM and another is restarted. Nothing the proxy
accepted may be lost or cut, and requests of one session keep landing on one replica, whose
cache metrics show it. Writes the figures to target/test-artifacts/failover.json."""

import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DEPLOY, ROOT

REPLICAS = 3
CLIENTS = 8
DURATION_S = float(os.environ.get("VLMSERVE_FAILOVER_S", "60"))
PACKAGE = ROOT / "models" / "shapes-vlm" / "package"
# One ONNX Runtime thread per replica: three replicas share this machine's cores.
REPLICA_CONFIG = f"""
[server]
http_workers = 2
shutdown_delay_s = 3.0
shutdown_timeout_s = 20

[[models]]
name = "shapes-vlm"
path = {json.dumps(str(PACKAGE))}
providers = [{{ kind = "cpu", threads = 1 }}]
"""
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Describe the image."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def wait_until(check, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Replica:
    def __init__(self, binary: Path, config: Path, port: int):
        self.binary, self.config, self.port = binary, config, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self):
        wait_until(lambda: get(self.url + "/ready")[0] == 200, f"replica {self.port} not ready")

    def terminate(self) -> int:
        """SIGTERM, as the kubelet sends it; the exit status once it drained."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def metric(self, name: str, labels: str = "") -> float:
        status, text = get(self.url + "/metrics")
        assert status == 200, status
        pattern = re.compile(rf"^{name}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", re.M)
        return sum(float(v) for v in pattern.findall(text))


def nginx_conf(tmp: Path, port: int, replicas: list[Replica]) -> Path:
    """The shipped file with this test's ports, inside a minimal nginx.conf that logs each
    request's session and the replica that answered."""
    shipped = (DEPLOY / "nginx" / "vlmserve.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{r.port} max_fails=1 fail_timeout=5s;\n" for r in replicas)
    site, count = re.subn(r"(    server 127\.0\.0\.1:\d+ [^\n]*\n)+", servers, shipped)
    assert count == 1
    site, count = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", site)
    assert count == 1
    (tmp / "vlmserve.conf").write_text(site)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir()
    tmp.chmod(0o777)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format route '$msec|$http_x_session_id|$upstream_addr|$upstream_status|$status|$request_uri';
    access_log {tmp}/access.log route;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/vlmserve.conf;
}}
""")
    return conf


@dataclass
class Route:
    """One chat completion as nginx logged it."""

    at: float  # when it ended, Unix seconds
    session: str
    port: str  # of the replica that answered
    status: str
    tried: int  # replicas tried


def routes(tmp: Path) -> list[Route]:
    out = []
    for line in (tmp / "access.log").read_text().splitlines():
        at, session, upstreams, _, status, uri = line.split("|")
        if uri != "/v1/chat/completions":
            continue
        # "a, b" when nginx tried a first: the last one answered.
        tried = upstreams.split(",")
        port = tried[-1].strip().rsplit(":", 1)[-1]
        out.append(Route(float(at), session if session != "-" else "", port, status, len(tried)))
    return out


def scene(seed: int) -> str:
    """A distinct small picture per session, as a data URL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), "white")
    x, y = 10 + seed * 7 % 50, 10 + seed * 13 % 50
    colors = ["red", "blue", "green", "yellow"]
    ImageDraw.Draw(image).ellipse([x, y, x + 30, y + 30], fill=colors[seed % len(colors)])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    import base64

    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Outcome:
    session: str
    started: float
    ok: bool
    detail: str = ""
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    finish: str | None = None


@dataclass
class Load:
    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, session: str, image: str):
        import openai

        client = openai.OpenAI(
            base_url=self.base + "/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
            default_headers={"x-session-id": session},
        )
        turn = 0
        while not self.stop.is_set():
            question = QUESTIONS[turn % len(QUESTIONS)]
            turn += 1
            started = time.monotonic()
            outcome = Outcome(session, started, ok=False)
            try:
                stream = client.chat.completions.create(
                    model="shapes-vlm",
                    max_tokens=24,
                    stream=True,
                    stream_options={"include_usage": True},
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": image}},
                                {"type": "text", "text": question},
                            ],
                        }
                    ],
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and outcome.ttft is None:
                        outcome.ttft = time.monotonic() - started
                    if chunk.choices and chunk.choices[0].finish_reason:
                        outcome.finish = chunk.choices[0].finish_reason
                    if chunk.usage:
                        outcome.tokens = chunk.usage.completion_tokens
                outcome.ok = outcome.finish in ("stop", "length") and outcome.tokens > 0
                outcome.detail = "" if outcome.ok else f"stream ended without a finish: {outcome.finish}"
            except Exception as e:  # noqa: BLE001 - every failure is an outcome to report
                outcome.detail = f"{type(e).__name__}: {e}"
            outcome.latency = time.monotonic() - started
            self.outcomes.append(outcome)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


@pytest.fixture()
def cluster(tmp_path):
    binary = Path(os.environ.get("VLMSERVE_BIN", ROOT / "target" / "release" / "vlmserve"))
    if not binary.is_file():
        pytest.fail(f"{binary} not built (cargo build --release)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).is_file(), "nginx not installed (scripts/setup-deploy.sh)"
    config = tmp_path / "replica.toml"
    config.write_text(REPLICA_CONFIG)
    replicas = [Replica(binary, config, free_port()) for _ in range(REPLICAS)]
    for r in replicas:
        r.start()
    proxy_dir = Path(tempfile.mkdtemp(prefix="vlmserve-nginx-"))
    port = free_port()
    proxy = subprocess.Popen([nginx, "-c", str(nginx_conf(proxy_dir, port, replicas)), "-p", str(proxy_dir)])
    try:
        for r in replicas:
            r.wait_ready()
        base = f"http://localhost:{port}"
        wait_until(lambda: get(base + "/health")[0] == 200, "nginx not answering")
        yield base, replicas, proxy_dir
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        for r in replicas:
            if r.proc and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        shutil.rmtree(proxy_dir, ignore_errors=True)


def post(base: str, body: dict, session: str | None = None) -> int:
    headers = {"content-type": "application/json", **({"x-session-id": session} if session else {})}
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as r:
        r.read()
        return r.status


def test_replicas_fail_over_without_losing_requests_and_sessions_stay_put(cluster):
    base, replicas, proxy_dir = cluster
    by_port = {str(r.port): r for r in replicas}
    hello = {"model": "shapes-vlm", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}

    # The metric the autoscalers read (deploy/k8s) is one the replicas export.
    assert "vlmserve_num_requests_waiting{" in get(replicas[0].url + "/metrics")[1]

    # Without a session key requests spread over the replicas.
    for _ in range(30):
        assert post(base, hello) == 200
    wait_until(lambda: len(routes(proxy_dir)) == 30, "requests not logged", timeout=5)
    assert len({route.port for route in routes(proxy_dir)}) == REPLICAS

    # Sessions whose replicas cover all three: A will be stopped, B restarted, C left alone.
    homes: dict[str, str] = {}
    for n in range(200):
        session = f"session-{n}"
        before = len(routes(proxy_dir))
        assert post(base, hello, session) == 200
        # nginx logs a request just after its response.
        logged = lambda n=before, key=session: [r for r in routes(proxy_dir)[n:] if r.session == key]  # noqa: E731
        wait_until(logged, "request not logged", timeout=5)
        [probe] = logged()
        port = probe.port
        if sum(1 for p in homes.values() if p == port) < -(-CLIENTS // REPLICAS):
            homes[session] = port
        if len(homes) == CLIENTS:
            break
    assert len(homes) == CLIENTS and len(set(homes.values())) == REPLICAS, homes
    a, b, c = [by_port[str(r.port)] for r in replicas]
    # Requests before the load (the probes above) are not part of the per-session routes.
    load_from = len(routes(proxy_dir))
    c_prefix_hits_before = c.metric("vlmserve_prefix_cache_lookups_total", 'result="hit"')

    load = Load(base)
    clients = [
        threading.Thread(target=load.client, args=(session, scene(i)), daemon=True) for i, session in enumerate(homes)
    ]
    started, wall_started = time.monotonic(), time.time()
    for t in clients:
        t.start()
    events = {}
    time.sleep(DURATION_S / 4)
    events["a_sigterm"] = time.time()
    a_exit = a.terminate()
    events["a_exited"] = time.time()
    time.sleep(max(0.0, DURATION_S / 2 - (time.monotonic() - started)))
    events["b_sigterm"] = time.time()
    b_exit = b.terminate()
    b.start()
    b.wait_ready()
    events["b_ready_again"] = time.time()
    time.sleep(max(0.0, DURATION_S - (time.monotonic() - started)))
    load.stop.set()
    for t in clients:
        t.join(timeout=150)
    elapsed = time.monotonic() - started
    assert (a_exit, b_exit) == (0, 0), "a drained replica exits 0"

    failed = [o for o in load.outcomes if not o.ok]
    assert not failed, failed[:5]
    assert len(load.outcomes) >= CLIENTS * 5, len(load.outcomes)

    # Each session's requests, in order, by the replica that answered them.
    wait_until(lambda: len(routes(proxy_dir)) - load_from >= len(load.outcomes), "requests not logged", timeout=5)
    answered = [r for r in routes(proxy_dir)[load_from:] if r.session in homes]
    assert all(r.status == "200" for r in answered)
    assert len(answered) == len(load.outcomes)
    # A session changes replica only while one stops or restarts, until nginx's passive check
    # (fail_timeout 5 s) has seen it back: elsewhere, every request of it on one replica.
    windows = [(events["a_sigterm"], events["a_exited"] + 6), (events["b_sigterm"], events["b_ready_again"] + 6)]
    runs: dict[str, list[str]] = {}
    for route in answered:
        seq = runs.setdefault(route.session, [])
        if seq and seq[-1] != route.port:
            assert any(start <= route.at <= end for start, end in windows), (route, seq, windows)
        if not seq or seq[-1] != route.port:
            seq.append(route.port)
    settled = [r for r in answered if r.at > windows[-1][1]]
    for session, seq in runs.items():
        home = homes[session]
        assert seq[0] == home, (session, seq)
        last = {r.port for r in settled if r.session == session}
        assert len(last) == 1, (session, last)
        if home == str(c.port):
            assert seq == [home], (session, seq)  # untouched replica: every request there
        elif home == str(a.port):
            assert home not in seq[1:], (session, seq)  # gone for good
        else:
            assert last == {home}, (session, seq)  # moved away and back

    # From the replicas' own metrics: on C each session's picture was encoded once, every later
    # request of that session found its features or its prefix cached; likewise on B after
    # its restart.
    c_sessions = {r.session for r in answered if r.port == str(c.port)}
    c_requests = sum(1 for r in answered if r.port == str(c.port))
    misses = c.metric("vlmserve_image_feature_cache_lookups_total", 'result="miss"')
    hits = c.metric("vlmserve_image_feature_cache_lookups_total", 'result="hit"')
    prefix_hits = c.metric("vlmserve_prefix_cache_lookups_total", 'result="hit"') - c_prefix_hits_before
    assert misses == len(c_sessions), (misses, c_sessions)
    # B's second process: once per session that came back to it (the sessions whose last run
    # is on B reached it only after the restart: before, it was down or they were elsewhere).
    b_sessions = {s for s, seq in runs.items() if seq[-1] == str(b.port)}
    b_misses = b.metric("vlmserve_image_feature_cache_lookups_total", 'result="miss"')
    assert b_sessions and b_misses == len(b_sessions), (b_misses, b_sessions)
    # Every other request there: its image's features cached, or its first prompt block (the
    # image and the question's start) in the prefix cache, which then needs no features.
    assert hits + prefix_hits == c_requests - misses, (hits, prefix_hits, c_requests)

    ok = load.outcomes
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    latencies = [o.latency for o in ok]
    report = {
        "replicas": REPLICAS,
        "clients": CLIENTS,
        "duration_s": round(elapsed, 1),
        "requests": len(ok),
        "failed": len(failed),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "tokens_per_s": round(sum(o.tokens for o in ok) / elapsed, 1),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "events_s": {k: round(v - wall_started, 1) for k, v in events.items()},
        "session_routes": {
            s: [{str(a.port): "A", str(b.port): "B", str(c.port): "C"}[p] for p in seq] for s, seq in runs.items()
        },
        # Requests a stopping or starting replica refused, answered by another.
        "retried_by_proxy": sum(1 for r in answered if r.tried > 1),
        "c_feature_cache_misses": misses,
        "b_restarted_feature_cache_misses": b_misses,
        "c_requests": c_requests,
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        ),
    }
    artifacts = ROOT / "target" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "failover.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
