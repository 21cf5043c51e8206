"""deploy/kubernetes: every manifest validated by kubernetes-validate (strict) for a current
Kubernetes version, plus the cross-references no schema checks (selectors, port names, the
mesh list, certificate file names, the coordinator's map and config)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import DEPLOY, derpd_bin, missing

KUBE = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
# Kinds without a schema in kubernetes-validate (kustomize's own file, Prometheus Operator CRDs):
# checked by the cross-reference tests below instead.
NO_SCHEMA = {"Kustomization", "PodMonitor", "ServiceMonitor"}


def _kv() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate not installed: pip install 'kubernetes-validate' (in the test extra)")
    return kubernetes_validate


def _manifests() -> list[Path]:
    return sorted(KUBE.rglob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in _manifests():
        for doc in _docs(path):
            out[doc["kind"], doc.get("metadata", {}).get("name", path.name)] = doc
    return out


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(KUBE)))
def test_manifest_validates(path: Path) -> None:
    kv = _kv()
    docs = _docs(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        if doc["kind"] in NO_SCHEMA:
            continue
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_checked() -> None:
    """Kinds skipped by the schema test are exactly the known schema-less ones."""
    kv = _kv()
    for path in _manifests():
        for doc in _docs(path):
            if doc["kind"] not in NO_SCHEMA:
                continue
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomizations_list_every_manifest() -> None:
    for kfile in KUBE.rglob("kustomization.yaml"):
        listed = set(yaml.safe_load(kfile.read_text())["resources"])
        present = {p.name for p in kfile.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{kfile}: listed {sorted(listed)}, present {sorted(present)}"


def test_kustomize_build_validates(tmp_path: Path) -> None:
    """`kubectl kustomize` renders each kustomization; the output validates (optional tool)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (optional: the per-file validation above covers the manifests)")
    kv = _kv()
    for kdir in (KUBE, KUBE / "monitoring"):
        r = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        assert docs
        for doc in docs:
            assert doc["metadata"].get("namespace", "derp") == "derp" or doc["kind"] == "Namespace"
            if doc["kind"] not in NO_SCHEMA:
                kv.validate(doc, KUBERNETES_VERSION, strict=True)


def _relay() -> tuple[dict[str, Any], dict[str, Any]]:
    sts = _all()["StatefulSet", "derpd"]
    return sts, sts["spec"]["template"]["spec"]["containers"][0]


def test_region_cross_references() -> None:
    objs = _all()
    sts, container = _relay()
    n = sts["spec"]["replicas"]
    pods = [f"derpd-{i}" for i in range(n)]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}

    # Headless Service for mesh names, named by the StatefulSet.
    headless = objs["Service", sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # One Service per pod, selecting exactly that pod, exposing TLS, HTTP and STUN.
    for pod in pods:
        svc = objs["Service", pod]["spec"]
        assert svc["selector"]["statefulset.kubernetes.io/pod-name"] == pod
        assert {(p["protocol"], p["targetPort"]) for p in svc["ports"]} == {
            ("TCP", "derp"), ("TCP", "http"), ("UDP", "stun")}
        assert {p["targetPort"] for p in svc["ports"]} <= port_names
    # Mesh with every relay of the region; the key from the Secret.
    mesh = container["args"][container["args"].index("--mesh-with") + 1].split(",")
    # name/dialhost: the public name (TLS, SNI) and the pod's address through the headless Service
    assert mesh == [f"{pod}.derp.example.com/{pod}.{sts['spec']['serviceName']}.derp.svc.cluster.local"
                    for pod in pods]
    env = {e["name"]: e.get("value") for e in container["env"]}
    key_mount = next(m for m in container["volumeMounts"] if env["DERPD_MESH_PSK_FILE"].startswith(m["mountPath"]))
    key_volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == key_mount["name"])
    secret = objs["Secret", key_volume["secret"]["secretName"]]
    assert len(secret["stringData"]["mesh.key"]) == 64
    # Let's Encrypt: each relay keeps its certificate and ACME account key on its own volume,
    # and its Service exposes 443 (TLS-ALPN-01) and 80 (HTTP-01) to the CA.
    assert env["DERPD_CERTMODE"] == "letsencrypt" and env["DERPD_HTTP_PORT"] == "80"
    state = next(m for m in container["volumeMounts"] if env["DERPD_CERTDIR"].startswith(m["mountPath"]))
    assert state["name"] in {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert not state.get("readOnly")
    for pod in pods:
        assert {p["port"] for p in objs["Service", pod]["spec"]["ports"]} >= {443, 80}
    # Probes and monitors use declared ports.
    assert container["readinessProbe"]["httpGet"]["port"] in port_names
    assert container["livenessProbe"]["tcpSocket"]["port"] in port_names
    pm = objs["PodMonitor", "derpd"]["spec"]
    assert pm["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {e["port"] for e in pm["podMetricsEndpoints"]} <= port_names
    assert pod_labels[pm["jobLabel"]] == "derpd"  # the job rules.yml expects
    # PodDisruptionBudget selects the relays.
    assert objs["PodDisruptionBudget", "derpd"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_coordinator_config_and_map(tmp_path: Path) -> None:
    """The ConfigMap's TOML is accepted by `derpd coordinator --check` and publishes every relay."""
    import json

    objs = _all()
    sts, container = _relay()
    env = {e["name"]: e.get("value") for e in container["env"]}
    config = tmp_path / "coordinator.toml"
    config.write_text(objs["ConfigMap", "derpd-coordinator"]["data"]["coordinator.toml"])
    r = subprocess.run([derpd_bin(), "coordinator", "--config", str(config), "--check",
                        "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    derp_map = json.loads(r.stdout)
    hosts = sorted(node["HostName"] for region in derp_map["Regions"].values() for node in region["Nodes"])
    assert hosts == sorted(env["DERPD_HOSTNAME"].replace("$(POD_NAME)", f"derpd-{i}")
                           for i in range(sts["spec"]["replicas"]))

    coordinators = objs["StatefulSet", "derpd-coordinator"]["spec"]
    deploy = coordinators["template"]
    c = deploy["spec"]["containers"][0]
    # Replicas: each keeps its state on its own volume, and relays can name each one.
    assert coordinators["replicas"] >= 2
    state = next(m for m in c["volumeMounts"] if m["name"] == "state")
    assert c["args"][c["args"].index("--state-dir") + 1] == state["mountPath"]
    assert [t["metadata"]["name"] for t in coordinators["volumeClaimTemplates"]] == ["state"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    peers = objs["Service", coordinators["serviceName"]]["spec"]
    assert peers["clusterIP"] == "None" and peers["selector"].items() <= deploy["metadata"]["labels"].items()
    svc = objs["Service", "derpd-coordinator"]
    sm = objs["ServiceMonitor", "derpd-coordinator"]["spec"]
    assert svc["spec"]["selector"].items() <= deploy["metadata"]["labels"].items()
    assert {p["name"] for p in svc["spec"]["ports"]} >= {e["port"] for e in sm["endpoints"]}
    assert sm["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["labels"][sm["jobLabel"]] == "derpd-coordinator"
    assert c["args"][:2] == ["derpd", "coordinator"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert c["args"][c["args"].index("--config") + 1] == mount["mountPath"] + "/coordinator.toml"
