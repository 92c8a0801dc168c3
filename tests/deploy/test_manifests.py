"""deploy/k8s rendered as kubectl would apply it, validated against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: an unknown or misspelt field fails) and, for the custom
resources, against their CRDs' schemas; then the settings that must agree across files."""

import copy
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import DEPLOY, ROOT

K8S = DEPLOY / "k8s"
# The oldest Kubernetes release the manifests claim, and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# vlmserve's own seconds after shutdown_timeout_s for the last responses (src/server/app.rs).
RESPONSE_GRACE_S = 5


def render(kubectl: str, path: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def alternatives(tmp_path: Path) -> Path:
    """An overlay with the components the shipped overlays leave out: KEDA and ingress-nginx."""
    overlay = tmp_path / "alternatives"
    overlay.mkdir()
    # kustomize takes only relative paths.
    components = [
        os.path.relpath(K8S / "components" / name, overlay) for name in ("keda", "ingress-nginx", "models-pvc")
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "components": components,
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return overlay


@pytest.fixture(scope="module")
def variants(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("k8s")
    paths = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu", "alternatives": alternatives(tmp)}
    return {name: render(kubectl, path) for name, path in paths.items()}


def schema_errors(docs: list[dict]) -> list[str]:
    """What the validators refuse in `docs`: built-in kinds by Kubernetes' schemas, custom
    resources by their CRDs'; a kind neither knows is an error too."""
    errors, custom = [], []
    for doc in docs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                custom.append(doc)
                break
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {path}: {e.message}")
    if custom:
        out = subprocess.run(
            ["node", str(Path(__file__).parent / "validate-custom-resources.mjs")],
            input=json.dumps(custom),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            result = json.loads(line)
            if result["error"]:
                errors.append(f"{result['kind']}/{result['name']}: {result['error']}")
    return errors


def one(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict]) -> dict:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_every_rendering_is_valid(variants):
    for name, docs in variants.items():
        assert schema_errors(docs) == [], name
    kinds = {d["kind"] for docs in variants.values() for d in docs}
    assert kinds >= {
        "Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "PersistentVolumeClaim",
        "HorizontalPodAutoscaler", "ServiceMonitor", "ScaledObject", "Ingress",
    }  # fmt: skip


def test_a_broken_field_fails_validation(variants):
    docs = variants["cpu"]
    broken = copy.deepcopy(docs)
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    assert any("readinesProbe" in e for e in schema_errors(broken))
    broken = copy.deepcopy(docs)
    container(broken)["ports"][0]["containerPort"] = "8080"
    assert any("containerPort" in e for e in schema_errors(broken))
    broken = copy.deepcopy(docs)
    one(broken, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] = "eight"
    assert any("maxReplicas" in e for e in schema_errors(broken))
    broken = copy.deepcopy(docs)
    one(broken, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] = 15
    assert any("interval" in e for e in schema_errors(broken))
    assert any(
        "no schema" in e for e in schema_errors([{"apiVersion": "x/v1", "kind": "Y", "metadata": {"name": "z"}}])
    )


def config(docs: list[dict]) -> dict:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vlmserve-config")]
    return tomllib.loads(cm["data"]["config.toml"])


def test_probes_shutdown_and_ports_agree_with_the_server_configuration(variants):
    for name, docs in variants.items():
        server = config(docs)["server"]
        c = container(docs)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert c["env"][0] == {"name": "VLMSERVE_CONFIG", "value": "/etc/vlmserve/config.toml"}, name
        [port] = c["ports"]
        assert (port["name"], port["containerPort"], server["port"], server["host"]) == ("http", 8080, 8080, "0.0.0.0")
        assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
        for probe, path in [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")]:
            assert c[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
        # The pod is killed only after preStop, the drain delay, the running requests' time and
        # the last responses' writing.
        [sleep, seconds] = c["lifecycle"]["preStop"]["exec"]["command"]
        needed = int(seconds) + server["shutdown_delay_s"] + server["shutdown_timeout_s"] + RESPONSE_GRACE_S
        assert sleep == "sleep" and pod["terminationGracePeriodSeconds"] >= needed, name
        # Readiness fails fast enough to be seen during the drain delay.
        readiness = c["readinessProbe"]
        assert readiness["periodSeconds"] * readiness["failureThreshold"] < server["shutdown_delay_s"], name


def test_pods_run_as_the_image_user_with_a_read_only_root(variants):
    containerfile = (DEPLOY / "Containerfile").read_text()
    [uid] = set(re.findall(r"^USER (\d+):\d+$", containerfile, re.M))
    for name, docs in variants.items():
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c = container(docs)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(uid), name
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, name
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/vlmserve", "/models", "/tmp"}, name


def test_the_gpu_overlay_asks_for_a_gpu_and_names_cuda(variants):
    docs = variants["gpu"]
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":gpu")
    assert all(m["providers"][0]["kind"] == "cuda" for m in config(docs)["models"])
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert (
        volumes["models"]["persistentVolumeClaim"]["claimName"]
        == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    )
    assert "emptyDir" not in volumes["models"]


def test_autoscalers_own_the_replica_count_and_read_a_metric_vlmserve_exports(variants):
    metrics = (ROOT / "src" / "scheduler" / "metrics.rs").read_text()
    for name in ("cpu", "gpu"):
        docs = variants[name]
        assert "replicas" not in one(docs, "Deployment")["spec"], name
        [metric] = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "vlmserve_num_requests_waiting"
    scaled = one(variants["alternatives"], "ScaledObject")
    assert "vlmserve_num_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert '"num_requests_waiting"' in metrics
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == "vlmserve_num_requests_waiting"


def test_proxies_hash_on_the_same_session_key(variants):
    ingress = one(variants["alternatives"], "Ingress")
    key = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    controller = yaml.safe_load((K8S / "ingress-nginx-controller-configmap.yaml").read_text())
    snippet = controller["data"]["http-snippet"]
    standalone = (DEPLOY / "nginx" / "vlmserve.conf").read_text()
    assert key == "$vlmserve_route_key"
    for text in (snippet, standalone):
        assert "map $http_x_session_id $vlmserve_route_key" in text
    assert "hash $vlmserve_route_key consistent;" in standalone
