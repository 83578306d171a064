"""infra/k8s/ validates strictly (an unknown field is an error, as with `kubectl apply
--validate=strict`) against the versions it ships for: Kubernetes 1.33 (the JSON schemas that
kubernetes-validate bundles) and the KubeRay v1.7.0 CRDs. The CRDs are vendored, gzipped, in
tests/support/schemas/kuberay-v1.7.0/: helm-chart/kuberay-operator/crds/ of ray-project/kuberay
at tag v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7), since tests download
nothing."""

from __future__ import annotations

import copy
import gzip
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.test_manifests import Doc, manifest_docs

KUBERNETES = "1.33.0"
CRDS = Path(__file__).resolve().parents[1] / "support" / "schemas" / "kuberay-v1.7.0"


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as the API server applies it under strict validation: an object
    with declared properties accepts no others, unless it says it keeps unknown fields
    (``x-kubernetes-preserve-unknown-fields``) or declares ``additionalProperties``."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":  # a map of field name -> schema, not a schema itself
            out[key] = {name: strict(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = strict(value)
        else:
            out[key] = value
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict schema of each served version of the vendored CRDs."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml.gz")):
        # The C loader when PyYAML has it: the three CRDs are 3 MB of YAML (12 s in Python).
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=loader)  # noqa: S506
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def problems(body: dict) -> list[str]:
    """Every schema violation of one manifest document (empty: valid)."""
    key = (body.get("apiVersion", ""), body.get("kind", ""))
    if key not in crd_schemas():
        try:
            kubernetes_validate.validate(body, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
        return []
    validator = jsonschema.Draft202012Validator(crd_schemas()[key])
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
             for e in validator.iter_errors(body)]  # fmt: skip
    # A CRD types its metadata only as "object"; the API server checks it as ObjectMeta.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": body.get("metadata", {})}
    try:
        kubernetes_validate.validate(meta, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        found.append(f"metadata: {e.message}")
    return found


def test_the_vendored_crds_are_kuberay_v1_7s_and_strict():
    kinds = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob")}
    assert kinds <= set(crd_schemas()), sorted(crd_schemas())
    # The strict transform closes objects but leaves those that keep unknown fields open.
    open_ = {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
             "properties": {"a": {"type": "string"}}}  # fmt: skip
    assert "additionalProperties" not in strict(open_)
    assert strict({"type": "object", "properties": {"a": {}}})["additionalProperties"] is False


@pytest.mark.parametrize("doc", manifest_docs(), ids=lambda d: d.where)
def test_every_manifest_validates_strictly(doc: Doc):
    assert problems(doc.body) == [], doc.where


def _planted(kind: str, path: tuple[str | int, ...], field: str) -> dict:
    body = copy.deepcopy(next(d.body for d in manifest_docs() if d.kind == kind))
    node = body
    for step in path:
        node = node[step]
    node[field] = 1
    return body


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    [
        # A typo of maxReplicas deep inside the worker group: pruned silently without strict.
        ("RayCluster", ("spec", "workerGroupSpecs", 0), "maxReplica"),
        # Inside the RayCluster template the RayCronJob embeds through its RayJob template.
        ("RayCronJob", ("spec", "jobTemplate", "rayClusterSpec", "headGroupSpec"), "numCpus"),
        ("RayJob", ("spec",), "activeDeadline"),
        ("Deployment", ("spec", "template", "spec"), "serviceAcount"),
        ("NetworkPolicy", ("spec",), "ingres"),
    ],
)
def test_an_unknown_field_is_found(kind: str, path: tuple, field: str):
    found = problems(_planted(kind, path, field))
    assert found and field in " ".join(found), found
