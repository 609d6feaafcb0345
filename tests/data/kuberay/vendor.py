"""Re-make the vendored KubeRay v1 schemas from a KubeRay checkout (run by hand, never
at test time): python tests/data/kuberay/vendor.py KUBERAY_GIT_DIR TAG

Takes the ``v1`` version's ``openAPIV3Schema`` of ray.io_rayjobs.yaml and
ray.io_rayclusters.yaml (helm-chart/kuberay-operator/crds/ at TAG), drops the
``description`` texts, and moves each subtree that occurs more than once (the pod
templates, mostly) into ``$defs`` under a ``$ref``: the same schema, a tenth of the size.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
MIN_SHARED = 2000  # characters: smaller repeated subtrees stay inline


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def canon(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def count_subtrees(node, counts: dict[str, int], top: bool = False) -> None:
    if isinstance(node, dict):
        if not top and "$ref" not in node:
            key = canon(node)
            if len(key) >= MIN_SHARED:
                counts[key] = counts.get(key, 0) + 1
        for v in node.values():
            count_subtrees(v, counts)
    elif isinstance(node, list):
        for v in node:
            count_subtrees(v, counts)


def replace_subtree(node, key: str, ref: dict):
    if isinstance(node, dict):
        if canon(node) == key:
            return dict(ref)
        return {k: replace_subtree(v, key, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [replace_subtree(v, key, ref) for v in node]
    return node


def share(schema: dict) -> dict:
    """Move repeated subtrees (largest first) into $defs."""
    defs: dict[str, dict] = {}
    while True:
        counts: dict[str, int] = {}
        count_subtrees(schema, counts, top=True)
        for d in defs.values():
            count_subtrees(d, counts, top=True)
        repeated = [k for k, c in counts.items() if c > 1]
        if not repeated:
            break
        key = max(repeated, key=len)
        name = "s" + hashlib.sha256(key.encode()).hexdigest()[:12]
        ref = {"$ref": f"#/$defs/{name}"}
        schema = replace_subtree(schema, key, ref)
        defs = {n: replace_subtree(d, key, ref) for n, d in defs.items()}
        defs[name] = json.loads(key)
    return {**schema, "$defs": dict(sorted(defs.items()))} if defs else schema


def main(repo: str, tag: str) -> None:
    commit = subprocess.run(
        ["git", "-C", repo, "rev-parse", f"{tag}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for kind in ("rayjobs", "rayclusters"):
        path = f"helm-chart/kuberay-operator/crds/ray.io_{kind}.yaml"
        text = subprocess.run(
            ["git", "-C", repo, "show", f"{commit}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = share(strip(version["schema"]["openAPIV3Schema"]))
        schema = {
            "$comment": f"KubeRay {tag} ({commit}) {path}, v1 openAPIV3Schema; "
            "descriptions dropped, repeated subtrees in $defs. Apache-2.0.",
            **schema,
        }
        out = HERE / f"{kind}.v1.schema.json"
        out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(out, out.stat().st_size)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
