"""The Kubernetes manifests, validated offline against the upstream CRD schemas (no cluster here).

The schemas are test data in ``../shared/k8s/crds`` (skipped cleanly when absent). A real API
server prunes unknown fields silently, so a misspelt field would pass a plain schema check:
objects whose schema neither lists ``additionalProperties`` nor keeps unknown fields get
``additionalProperties: false`` here.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from afm.cli import cli

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "infra" / "k8s" / "base"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
CRD_FILES = {
    ("trainer.kubeflow.org", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("sparkoperator.k8s.io", "SparkApplication"): "sparkoperator.k8s.io_sparkapplications.yaml",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
}


def _manifests() -> list[tuple[str, dict]]:
    files = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    return [(f, doc) for f in files for doc in yaml.safe_load_all((BASE / f).read_text()) if doc]


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that does not say otherwise."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def _schema(group: str, kind: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[(group, kind)]).read_text())
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not the CRD's
    return _closed(schema)


def _custom(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in docs if (d["apiVersion"].partition("/")[0], d["kind"]) in CRD_FILES]


def _builtin(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in docs if (d["apiVersion"].partition("/")[0], d["kind"]) not in CRD_FILES]


def _id(x: object) -> str:
    return x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}" if isinstance(x, dict) else ""


@pytest.mark.parametrize(("path", "doc"), _builtin(_manifests()), ids=_id)
def test_built_in_resources_match_the_kubernetes_schema(path: str, doc: dict) -> None:
    """ConfigMap, PVC, Deployment, Service: kubernetes-validate's schemas, unknown fields refused."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_secrets_are_referenced_by_name_never_stored() -> None:
    docs = _manifests()
    assert not [d for _, d in docs if d["kind"] == "Secret"]
    text = "\n".join((BASE / f).read_text() for f in {f for f, _ in docs})
    refs = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: ([\w-]+)\}", text))
    assert refs == {("afm-secrets", "admin-token"), ("afm-secrets", "redis-password")}
    names = {d["metadata"]["name"] for _, d in docs}
    assert {"afm-config", "afm-data", "afm-redis"} <= names  # what the workloads name exists in the base


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/k8s/crds is not present")
@pytest.mark.parametrize(("path", "doc"), _custom(_manifests()), ids=_id)
def test_custom_resources_match_their_crd_schema(path: str, doc: dict) -> None:
    group, _, version = doc["apiVersion"].partition("/")
    jsonschema.validate(doc, _schema(group, doc["kind"], version))
    assert len(doc["metadata"]["name"]) <= 63


def test_a_misspelt_field_is_caught() -> None:
    if not CRDS.exists():
        pytest.skip("../shared/k8s/crds is not present")
    (doc,) = [d for f, d in _manifests() if d["kind"] == "TrainJob" and "pretrain" in f]
    bad = copy.deepcopy(doc)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        jsonschema.validate(bad, _schema("trainer.kubeflow.org", "TrainJob", "v1alpha1"))


def _afm_args(doc: dict) -> list[str]:
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["trainer"]["command"] == ["afm"]
        return doc["spec"]["trainer"]["args"]
    if doc["kind"] == "SparkApplication":
        assert doc["spec"]["mainApplicationFile"].endswith("/afm/cli.py")
        return doc["spec"]["arguments"]
    (container,) = doc["spec"]["predictor"]["containers"]
    return container["args"]


@pytest.mark.parametrize(("path", "doc"), _custom(_manifests()), ids=_id)
def test_every_afm_command_and_option_in_a_manifest_exists(path: str, doc: dict) -> None:
    args = [str(a) for a in _afm_args(doc)]
    words = [a for a in args if not a.startswith("-")][: next(i for i, a in enumerate(args) if a.startswith("-"))]
    res = CliRunner().invoke(cli, [*words, "--help"])
    assert res.exit_code == 0, f"afm {' '.join(words)}: {res.output}"
    for option in (a for a in args if a.startswith("--")):
        assert option in res.output, f"afm {' '.join(words)} has no option {option}"
