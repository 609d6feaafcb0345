"""jobs/k8s/: the KubeRay manifests of a coordinator and a site, checked offline.

The RayJobs are validated against the v1 openAPIV3Schema of KubeRay's own CRDs
(``ray.io_rayjobs.yaml`` and ``ray.io_rayclusters.yaml`` of a pinned release, vendored in
tests/data/kuberay/; nothing is downloaded here), with unknown fields refused as
``kubectl apply --validate=strict`` would. Then what the deployment promises: only the
federation port is exposed, and only by the coordinator; a site has no Service and no
inbound port; Ray's token auth is on, its token from a Secret; no secret value inline.
And that the entrypoints run as written: every override is a fedray config key (or a
config group's option, or a Hydra key), the composed config passes the party's own
checks, and the mounts give the files where ``fedray.federation.site.Paths`` reads them.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "jobs" / "k8s"
CONF = ROOT / "conf"
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


def entrypoint(rayjob: dict) -> tuple[str, dict[str, str]]:
    """The entrypoint's module and its overrides, ``{name: value}``."""
    words = shlex.split(rayjob["spec"]["entrypoint"])  # a shell command line
    assert words[:2] == ["python", "-m"], words
    args = words[3:]
    assert all("=" in a for a in args), args
    overrides = dict(a.split("=", 1) for a in args)
    assert len(overrides) == len(args), "an override given twice"
    return words[2], overrides


def volume_files(template: dict, container: dict) -> tuple[dict, dict]:
    """What a container's mounts put where: ``{file: (kind, name, key, mode)}`` for the
    items of configMap, secret and projected volumes, ``{dir: (claim, read_only)}`` for
    persistent volume claims."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    files: dict[str, tuple] = {}
    claims: dict[str, tuple] = {}
    for mount in container.get("volumeMounts", []):
        volume, root = volumes[mount["name"]], mount["mountPath"].rstrip("/")
        sources = []
        if "projected" in volume:
            default = volume["projected"].get("defaultMode", 0o644)
            sources = [(*next(iter(s.items())), default) for s in volume["projected"]["sources"]]
        for kind in ("configMap", "secret"):
            if kind in volume:
                sources.append((kind, volume[kind], volume[kind].get("defaultMode", 0o644)))
        for kind, ref, default in sources:
            name = ref.get("name", ref.get("secretName"))
            assert "items" in ref, f"{kind} {name}: list its items, so the layout is known"
            for item in ref["items"]:
                files[f"{root}/{item['path']}"] = (
                    kind,
                    name,
                    item["key"],
                    item.get("mode", default),
                )
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            claims[root] = (claim["claimName"], mount.get("readOnly") or claim.get("readOnly"))
    return files, claims


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
        certs = [v for t in pod_templates(job) for v in t["spec"].get("volumes", [])
                 if v["name"] == "certs"]  # fmt: skip
        assert certs
        for v in certs:  # the identity comes from a Secret, the manifest from a ConfigMap
            kinds = [next(iter(s)) for s in v["projected"]["sources"]]
            assert sorted(kinds) == ["configMap", "secret"], kinds


# -- a site: dials out, nothing in -------------------------------------------------------------


def test_site_runs_the_agent_with_its_own_policy(site):
    job = one(site, "RayJob")
    module, args = entrypoint(job)
    assert module == "fedray.site"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    files, _ = volume_files(head, head["spec"]["containers"][0])
    kind, name, key, _mode = files[args["federation.policy"]]
    assert (kind, name, key) == ("configMap", "fedray-site-policy", "policy.yaml")


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


# -- the entrypoints run as written ----------------------------------------------------------


def _hydra_key(key: str) -> bool:
    from hydra.conf import HydraConf
    from omegaconf import OmegaConf

    node = OmegaConf.structured(HydraConf)
    for part in key.split("."):
        # keys(), not `in node`: a MISSING value (run.dir) is not "in" a DictConfig
        if not OmegaConf.is_dict(node) or part not in node.keys():  # noqa: SIM118
            return False
        node = node._get_node(part)
    return True


def override_problem(name: str, value: str) -> str | None:
    """Why ``name=value`` is not an override fedray's launcher takes, or None."""
    from fedray.config import check_override_key

    if name.startswith("hydra."):
        return None if _hydra_key(name[len("hydra.") :]) else f"unknown Hydra key {name!r}"
    if "." not in name and (CONF / name).is_dir():  # a group selection: federation=cross_org
        if not (CONF / name / f"{value}.yaml").is_file():
            return f"{name}={value}: conf/{name}/ has no {value}.yaml"
        return None
    return check_override_key(name)


def test_the_override_check_can_fail():
    """Controls: the old, never-built names and near misses are refused."""
    for name, value in [
        ("federation.manifest", "/x"),
        ("federation.identity", "/x"),
        ("site.id", "a"),
        ("site.coordinator", "h:1"),
        ("datset", "csv"),
        ("dataset", "cvs"),
        ("hydra.run.dri", "/x"),
    ]:
        assert override_problem(name, value), name
    for name, value in [("federation", "cross_org"), ("rounds", "5"), ("hydra.run.dir", "/x")]:
        assert override_problem(name, value) is None, name


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_entrypoint_overrides_are_real_config_keys(name):
    _, args = entrypoint(one(docs(name), "RayJob"))
    problems = [p for k, v in args.items() if (p := override_problem(k, v))]
    assert problems == []
    for key in ("federation.party", "federation.certs", "federation.keys", "ray.address"):
        assert key in args, key
    assert args["ray.address"] == "auto"  # the driver joins the RayJob's own cluster


def test_coordinator_and_site_declare_the_same_job():
    """The job both sides must agree on (jobs/k8s/README.md): the client total, rounds,
    weight_ref, the DP noise and the table schema, key for key; no party reads another's
    tables, so a schema that differs is a model the site cannot decode (or misaligned)."""
    _, coordinator = entrypoint(one(docs("coordinator.yaml"), "RayJob"))
    _, site = entrypoint(one(docs("site.yaml"), "RayJob"))
    shared = ["num_clients", "rounds", "dataset.weight_ref", "privacy.noise_multiplier"]
    shared += [k for k in coordinator if k.startswith("dataset") and k != "dataset.path"]
    assert {"dataset", "dataset.features", "dataset.num_classes"} <= set(shared)
    for key in shared:
        assert site.get(key) == coordinator[key], key


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_entrypoint_config_passes_the_partys_checks(name):
    """The overrides compose (as the launcher and the site agent compose them) into a
    config that the coordinator's or the site's own start-up checks accept."""
    from fedray.federation.coordinator import check_coordinator_config
    from fedray.federation.site import check_site_config
    from fedray.launch import prepare_overrides
    from tests.conftest import compose

    module, args = entrypoint(one(docs(name), "RayJob"))
    overrides = [a for a in prepare_overrides([f"{k}={v}" for k, v in args.items()])
                 if not a.startswith("hydra.")]  # fmt: skip
    if module == "fedray.site":
        cfg = compose(["federation=cross_org", *overrides])  # what fedray.site adds
        check_site_config(cfg)
    else:
        assert module == "fedray.launch"
        cfg = compose(overrides)
        assert cfg.federation.name == "cross_org"
        check_coordinator_config(cfg)
    assert cfg.crypto.custody == "threshold"


def _paths(args: dict[str, str], monkeypatch):
    """fedray's own Paths for this entrypoint's party (the manifest is not read)."""
    from fedray.federation import site as site_mod

    manifest = SimpleNamespace(coordinator=SimpleNamespace(id="coordinator"), sites={})
    monkeypatch.setattr(site_mod.ch.Manifest, "load", staticmethod(lambda path: manifest))
    fed = SimpleNamespace(
        certs=args["federation.certs"], keys=args["federation.keys"],
        party=args["federation.party"], state=args.get("federation.state"),
    )  # fmt: skip
    return site_mod.Paths(SimpleNamespace(federation=fed))


@pytest.mark.parametrize("name", ["coordinator.yaml", "site.yaml"])
def test_mounts_give_the_paths_layout(name, monkeypatch):
    """/etc/fedray/certs holds federation.json, ca.pem and PARTY/{cert.pem, key.pem,
    signing.key} from the manifest ConfigMap and the party's TLS Secret, the private files
    0400; federation.keys holds federation_key.json (and at a site its share and its
    record of rounds, on the state volume that survives restarts)."""
    items = docs(name)
    job = one(items, "RayJob")
    module, args = entrypoint(job)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    files, claims = volume_files(head, head["spec"]["containers"][0])
    paths = _paths(args, monkeypatch)
    assert paths.party == args["federation.party"]

    assert files[str(paths.manifest)][:3] == ("configMap", "fedray-federation", "federation.json")
    tls = {files[str(p)][1] for p in (paths.ca, paths.cert, paths.key, paths.signing_key)}
    assert len(tls) == 1, "one Secret: the party's TLS identity"
    for path, key, mode in [
        (paths.ca, "ca.pem", None),
        (paths.cert, "cert.pem", None),
        (paths.key, "key.pem", 0o400),
        (paths.signing_key, "signing.key", 0o400),
    ]:
        kind, _, got_key, got_mode = files[str(path)]
        assert (kind, got_key) == ("secret", key), path
        if mode is not None:
            assert got_mode == mode, f"{path}: mode {oct(got_mode)}"
    # 0400 files are root's: fsGroup makes them readable by the pod's non-root user.
    assert (
        head["spec"]["securityContext"]["fsGroup"] == head["spec"]["securityContext"]["runAsGroup"]
    )

    def on_state_volume(path) -> bool:
        pvcs = {d["metadata"]["name"] for d in items if d["kind"] == "PersistentVolumeClaim"}
        return any(
            str(path).startswith(root + "/") and claim in pvcs and not read_only
            for root, (claim, read_only) in claims.items()
        )

    if module == "fedray.site":
        assert on_state_volume(paths.federation_key) and on_state_volume(paths.share)
        # the record of the rounds it took part in survives a restart of the pod
        assert on_state_volume(paths.rounds) and str(paths.rounds) not in files
        assert str(paths.share) not in files  # the share is not in a ConfigMap or Secret
    else:
        kind, _, key, _ = files[str(paths.federation_key)]
        assert (kind, key) == ("configMap", "federation_key.json")
        assert not on_state_volume(paths.share) and str(paths.share) not in files
