"""deploy/k8s: every manifest passes Kubernetes' own schemas (kubernetes-validate, strict), and the fields the
routing, the probes, the scrape and the autoscaler depend on agree with the code that serves them."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fleet.local import NGINX, ensure_proxy_tools
from fleet.routing import KubernetesNames, kubernetes_nginx_config
from server.metrics import ServiceMetrics
from server.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
NAMES = KubernetesNames()


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for every resource the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_every_manifest_passes_the_kubernetes_schemas_and_the_kustomization_lists_them_all() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["configMapGenerator"][0]["files"] == ["nginx.conf"]
    version = kubernetes_validate.utils.latest_version()
    for doc in manifests().values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    statefulset = copy.deepcopy(manifests()[("StatefulSet", "streamedit")])
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, kubernetes_validate.utils.latest_version(), strict=True)


def test_replicas_name_themselves_and_probes_scrape_and_env_match_the_server() -> None:
    docs = manifests()
    statefulset = docs[("StatefulSet", NAMES.service)]
    pod = statefulset["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # The pod's own name is the replica name the router reads from session ids.
    assert env["STREAMEDIT_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert statefulset["spec"]["serviceName"] == NAMES.pods_service
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert (
        int(pod["metadata"]["annotations"]["prometheus.io/port"]) == NAMES.port == int(env["STREAMEDIT_PORT"]["value"])
    )
    assert pod["spec"]["hostNetwork"] is True and "nvidia.com/gpu" in container["resources"]["limits"]
    # Every STREAMEDIT_* variable is a setting, and the values make valid Settings.
    values = {
        name.removeprefix("STREAMEDIT_").lower(): e["value"].replace("$(NODE_IP)", "127.0.0.7")
        for name, e in env.items()
        if name.startswith("STREAMEDIT_") and "value" in e
    }
    settings = Settings(
        **{k: json.loads(v) if v.startswith("[") else v for k, v in values.items()}, replica="streamedit-0"
    )
    assert settings.ice_host_addresses == ["127.0.0.7"] and settings.udp_ports
    # New sessions: ready replicas only; a session's calls: every replica, ready (not full) or not.
    service, pods = docs[("Service", NAMES.service)], docs[("Service", NAMES.pods_service)]
    assert service["spec"]["selector"] == pods["spec"]["selector"] == pod["metadata"]["labels"]
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["publishNotReadyAddresses"] is True
    assert not service["spec"].get("publishNotReadyAddresses")


def test_the_autoscaler_scales_the_statefulset_on_a_metric_the_server_exports() -> None:
    hpa = manifests()[("HorizontalPodAutoscaler", NAMES.service)]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAMES.service}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"\n{metric} " in ServiceMetrics().render().decode()


def test_the_routers_nginx_conf_is_the_generated_one_and_nginx_accepts_it(tmp_path: Path) -> None:
    conf = (K8S / "nginx.conf").read_text()
    assert conf == kubernetes_nginx_config(), "regenerate: python -m fleet.routing kubernetes > deploy/k8s/nginx.conf"
    try:
        ensure_proxy_tools()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # Cluster DNS names do not resolve here: point them at loopback for nginx's own syntax and semantics check.
    local = conf.replace(f"{NAMES.service}.{NAMES.namespace}.svc.cluster.local", "127.0.0.1").replace(
        NAMES.resolver, "127.0.0.1"
    )
    (tmp_path / "nginx.conf").write_text(local)
    done = subprocess.run(
        [str(NGINX), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
