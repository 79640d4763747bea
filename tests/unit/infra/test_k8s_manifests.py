"""The Kubernetes manifests, validated offline against the upstream CRD schemas (no cluster here).

The schemas are test data in ``../shared/k8s/crds`` (skipped cleanly when absent). A real API
server prunes unknown fields silently, so a misspelt field would pass a plain schema check:
objects whose schema neither lists ``additionalProperties`` nor keeps unknown fields get
``additionalProperties: false`` here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from afm.cli import cli
from afm.k8s_validate import crd_schema, is_custom, validate
from afm.kustomize import render

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "infra" / "k8s"
BASE = K8S / "base"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
FOLDERS = ["base", "overlays/dev", "overlays/prod"]


def _manifests(folder: str = "base") -> list[tuple[str, dict]]:
    return [(folder, doc) for doc in render(K8S / folder)]


def _all() -> list[tuple[str, dict]]:
    return [pair for folder in FOLDERS for pair in _manifests(folder)]


def _custom(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in docs if is_custom(d)]


def _builtin(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in docs if not is_custom(d)]


def _id(x: object) -> str:
    return x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}" if isinstance(x, dict) else ""


@pytest.mark.parametrize(("path", "doc"), _builtin(_all()), ids=_id)
def test_built_in_resources_match_the_kubernetes_schema(path: str, doc: dict) -> None:
    """ConfigMap, PVC, Deployment, Service of the base and each overlay: kubernetes-validate, unknown fields refused."""
    validate(doc, CRDS)


def test_secrets_are_referenced_by_name_never_stored() -> None:
    docs = _all()
    assert not [d for _, d in docs if d["kind"] == "Secret"]
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    refs = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: ([\w-]+)\}", text))
    assert refs == {
        ("afm-secrets", "admin-token"),
        ("afm-secrets", "redis-password"),
        ("afm-secrets", "feast-registry-url"),
    }
    names = {d["metadata"]["name"] for _, d in docs}
    assert {"afm-config", "afm-data", "afm-redis"} <= names  # what the workloads name exists in the base


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/k8s/crds is not present")
@pytest.mark.parametrize(("path", "doc"), _custom(_all()), ids=_id)
def test_custom_resources_match_their_crd_schema(path: str, doc: dict) -> None:
    """TrainJob, SparkApplication, InferenceService of the base and each overlay, against the upstream CRDs."""
    validate(doc, CRDS)


def _pretrain() -> dict:
    (doc,) = [d for _, d in _manifests() if d["kind"] == "TrainJob" and d["metadata"]["name"] == "afm-pretrain"]
    return copy.deepcopy(doc)


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/k8s/crds is not present")
def test_a_misspelt_field_is_caught() -> None:
    bad = _pretrain()
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        validate(bad, CRDS)
    # the upstream schema alone lets it through (a real API server would drop the field silently)
    group, _, version = bad["apiVersion"].partition("/")
    crd = yaml.safe_load((CRDS / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    (open_schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    jsonschema.validate(
        bad, {**open_schema, "properties": {**open_schema["properties"], "metadata": {"type": "object"}}}
    )
    assert crd_schema(CRDS, group, "TrainJob", version)["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/k8s/crds is not present")
def test_a_wrong_type_is_caught() -> None:
    bad = _pretrain()
    bad["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validate(bad, CRDS)


def test_a_wrong_field_in_a_built_in_kind_is_caught() -> None:
    (redis,) = [d for _, d in _manifests() if d["kind"] == "Deployment"]
    misspelt = copy.deepcopy(redis)
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas", 1)
    wrong_type = copy.deepcopy(redis)
    wrong_type["spec"]["replicas"] = "one"
    for bad in (misspelt, wrong_type):
        with pytest.raises(Exception, match="replica"):
            validate(bad, CRDS)


def test_overlays_set_namespace_images_and_sizes() -> None:
    dev, prod = dict(_pairs("overlays/dev")), dict(_pairs("overlays/prod"))
    assert {d["metadata"].get("namespace") for d in dev.values()} == {"afm-dev"}
    assert {d["metadata"].get("namespace") for d in prod.values()} == {"activityfm"}
    assert dev[("TrainJob", "afm-pretrain")]["spec"]["trainer"]["numNodes"] == 1
    assert prod[("TrainJob", "afm-pretrain")]["spec"]["trainer"]["numNodes"] == 2
    assert (
        prod[("TrainJob", "afm-pretrain")]["spec"]["trainer"]["image"] == "registry.example.com/activityfm-cuda:0.1.0"
    )
    assert prod[("SparkApplication", "afm-features")]["spec"]["image"] == "registry.example.com/activityfm:0.1.0"
    (serving,) = prod[("InferenceService", "afm-ranker")]["spec"]["predictor"]["containers"]
    assert serving["image"] == "registry.example.com/activityfm:0.1.0" and serving["readinessProbe"]
    assert prod[("InferenceService", "afm-ranker")]["spec"]["predictor"]["minReplicas"] == 3


def _pairs(folder: str) -> list[tuple[tuple[str, str], dict]]:
    return [((d["kind"], d["metadata"]["name"]), d) for _, d in _manifests(folder)]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", FOLDERS)
def test_the_project_renderer_equals_kubectl_kustomize(folder: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, check=True)
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    assert dict(_pairs(folder)) == theirs


def test_afm_k8s_validate_and_render(tmp_path: Path) -> None:
    if not CRDS.exists():
        pytest.skip("../shared/k8s/crds is not present")
    ok = CliRunner().invoke(cli, ["k8s", "validate", str(K8S / "overlays" / "prod"), "--crds", str(CRDS)])
    assert ok.exit_code == 0 and "11/11 resources" in ok.output, ok.output
    out = CliRunner().invoke(
        cli, ["k8s", "render", str(K8S / "overlays" / "dev"), "--ds", "2026-01-05", "--image-tag", "7"]
    )
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.output) if d}
    assert docs["afm-features-2026-01-05"]["spec"]["arguments"] == ["features", "run-day", "--ds", "2026-01-05"]
    assert docs["afm-pretrain-2026-01-05"]["spec"]["trainer"]["image"] == "registry.example.com/activityfm-cuda:7"
    # an overlay with a misspelt field: the command names it and exits 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "kustomization.yaml").write_text(f"resources: [{K8S / 'base'}]\npatches: [{{path: p.yaml}}]\n")
    (tmp_path / "bad" / "p.yaml").write_text(
        "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: TrainJob\nmetadata: {name: afm-finetune}\nspec: {trainer: {numNode: 2}}\n"
    )
    bad = CliRunner().invoke(cli, ["k8s", "validate", str(tmp_path / "bad"), "--crds", str(CRDS)])
    assert bad.exit_code == 1 and "TrainJob/afm-finetune" in bad.output and "numNode" in bad.output, bad.output


def _afm_args(doc: dict) -> list[str]:
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["trainer"]["command"][-1] == "afm"
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
