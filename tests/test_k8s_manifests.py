"""jobs/k8s/: the KubeRay manifests of a coordinator and a site, checked offline.

The RayJobs are validated against the v1 openAPIV3Schema of KubeRay's own CRDs
(``ray.io_rayjobs.yaml`` and ``ray.io_rayclusters.yaml`` of a pinned release, vendored in
tests/data/kuberay/; nothing is downloaded here), with unknown fields refused as
``kubectl apply --validate=strict`` would. Then what the deployment promises: only the
federation port is exposed, and only by the coordinator; a site has no Service and no
inbound port; Ray's token auth is on, its token from a Secret; no secret value inline.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "jobs" / "k8s"
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
FEDERATION_PORT = 50051
KUBERAY_RELEASE = "v1.7.0"


def _strict(node):
    """Refuse unknown fields where the schema lists the known ones (kubectl's strict
    field validation), except where Kubernetes keeps unknown fields."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def validator(kind: str):
    schema = json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())
    assert KUBERAY_RELEASE in schema["$comment"]
    return jsonschema.Draft202012Validator(_strict(schema))


def schema_errors(kind: str, doc: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(kind).iter_errors(doc)
    ]


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(items: list[dict], kind: str) -> dict:
    found = [d for d in items if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_templates(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec.get("workerGroupSpecs", [])
    ]


def containers(rayjob: dict) -> list[dict]:
    return [c for t in pod_templates(rayjob) for c in t["spec"]["containers"]]


@pytest.fixture(scope="module")
def coordinator() -> list[dict]:
    return docs("coordinator.yaml")


@pytest.fixture(scope="module")
def site() -> list[dict]:
    return docs("site.yaml")


# -- against KubeRay's CRD schema -------------------------------------------------------------


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_rayjob_validates_against_the_kuberay_v1_crd(name):
    job = one(docs(name), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert schema_errors("rayjobs", job) == []
    # Its cluster is a valid RayCluster spec too (the RayCluster CRD's own schema).
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job["metadata"]["name"]},
        "spec": job["spec"]["rayClusterSpec"],
    }
    assert schema_errors("rayclusters", cluster) == []


def test_the_schema_check_can_fail(coordinator):
    """Controls: the validator refuses what the API server would."""
    job = one(coordinator, "RayJob")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["templat"] = {}
    assert any("templat" in e for e in schema_errors("rayjobs", typo))
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions/mode" in e for e in schema_errors("rayjobs", bad_enum))
    no_head = copy.deepcopy(job)
    del no_head["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in schema_errors("rayjobs", no_head))
    bad_port = copy.deepcopy(job)
    head = bad_port["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["ports"][0]["containerPort"] = "50051"
    assert schema_errors("rayjobs", bad_port)


# -- the coordinator: one port out, token auth ------------------------------------------------


def test_coordinator_runs_the_federation_endpoint(coordinator):
    job = one(coordinator, "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "fedray.launch"]
    assert "federation=cross_org" in entry
    assert f"federation.listen=0.0.0.0:{FEDERATION_PORT}" in entry


def test_coordinator_service_exposes_only_the_federation_port(coordinator):
    services = [d for d in coordinator if d["kind"] == "Service"]
    assert len(services) == 1
    svc = services[0]
    ports = svc["spec"]["ports"]
    assert [p["port"] for p in ports] == [FEDERATION_PORT]
    assert all(p.get("protocol", "TCP") == "TCP" for p in ports)
    # It selects the head pod, and its target is the head's federation port, no other.
    job = one(coordinator, "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    selector = svc["spec"]["selector"]
    assert selector.items() <= head["metadata"]["labels"].items()
    for worker in pod_templates(job)[1:]:
        assert not selector.items() <= worker["metadata"]["labels"].items()
    named = {p.get("name"): p["containerPort"] for c in head["spec"]["containers"]
             for p in c.get("ports", [])}  # fmt: skip
    target = ports[0]["targetPort"]
    assert named.get(target, target) == FEDERATION_PORT
    # Ray's own ports are not exposed some other way.
    spec = job["spec"]["rayClusterSpec"]
    assert "headService" not in spec["headGroupSpec"]
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for c in containers(job):
        assert all("hostPort" not in p for p in c.get("ports", []))
    for t in pod_templates(job):
        assert not t["spec"].get("hostNetwork", False)


def test_coordinator_network_policy_admits_outsiders_to_the_federation_port_only(coordinator):
    policy = one(coordinator, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"fedray.io/party": "coordinator"}
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        sources = rule.get("from")
        if not sources:  # from anywhere: the federation port alone
            assert [p["port"] for p in rule["ports"]] == [FEDERATION_PORT]
        else:
            assert all("ipBlock" not in s for s in sources)


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_ray_token_auth_from_a_secret(name):
    job = one(docs(name), "RayJob")
    auth = job["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for c in containers(job):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token", c["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, c["name"]
        assert token["valueFrom"]["secretKeyRef"] == {
            "name": auth["secretName"],
            "key": "auth_token",  # the key KubeRay reads
        }


SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|PRIVATE|_KEY$|^KEY", re.IGNORECASE)


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_no_secret_value_inline(name):
    text = (K8S / name).read_text()
    assert "-----BEGIN" not in text  # no certificate or key
    items = docs(name)
    assert all(d["kind"] != "Secret" for d in items), "secrets are created out of band"
    for job in (d for d in items if d["kind"] == "RayJob"):
        for c in containers(job):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]
        tls = [v for t in pod_templates(job) for v in t["spec"].get("volumes", [])
               if v["name"] == "tls"]  # fmt: skip
        assert tls and all("secret" in v for v in tls)


# -- a site: dials out, nothing in -------------------------------------------------------------


def test_site_runs_the_agent_with_its_own_policy(site):
    job = one(site, "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "fedray.site"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "configMap" in volumes["policy"] and "secret" in volumes["tls"]
    policy_arg = next(a for a in entry if a.startswith("site.policy="))
    assert policy_arg.split("=", 1)[1].startswith(mounts["policy"] + "/")


def test_site_has_no_service_and_no_inbound_port(site):
    assert all(d["kind"] not in ("Service", "Ingress", "Route", "Gateway") for d in site)
    job = one(site, "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert "headService" not in spec["headGroupSpec"]
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for c in containers(job):
        ports = c.get("ports", [])
        assert all("hostPort" not in p for p in ports)
        assert all(p["containerPort"] != FEDERATION_PORT for p in ports)
    for t in pod_templates(job):
        assert not t["spec"].get("hostNetwork", False)
    policy = one(site, "NetworkPolicy")
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a site admits no traffic from anywhere"
        assert all("ipBlock" not in s for s in rule["from"])


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_pods_run_unprivileged_without_a_service_account_token(name):
    """Every Ray pod: no Kubernetes API token, a non-root user, the runtime's seccomp
    profile; every container: no privilege escalation, no capabilities, a read-only root
    with an emptyDir /tmp for Ray's session files."""
    rayjob = one(docs(name), "RayJob")
    for template in pod_templates(rayjob):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in empty_dirs


def test_readme_says_network_policies_need_an_enforcing_cni():
    text = " ".join((K8S / "README.md").read_text().split())
    assert "enforces NetworkPolicy" in text
