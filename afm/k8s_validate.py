"""Offline validation of Kubernetes resources: custom resources against their CRD schemas, built-in kinds with kubernetes-validate.

A real API server prunes unknown fields silently, so a misspelt field would pass a plain
schema check: every object of a CRD schema that neither lists ``additionalProperties`` nor
keeps unknown fields (``x-kubernetes-preserve-unknown-fields``) is closed here
(``additionalProperties: false``). Built-in kinds go through ``kubernetes-validate`` in strict
mode (unknown fields refused).

Example:
    >>> errors = validate_all(render(Path("infra/k8s/overlays/prod")), Path("crds"))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml

#: (API group, kind) → the CRD file that defines it (the upstream file names)
CRD_FILES = {
    ("trainer.kubeflow.org", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("sparkoperator.k8s.io", "SparkApplication"): "sparkoperator.k8s.io_sparkapplications.yaml",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
}
#: the longest name Kubernetes accepts for these kinds (an RFC 1035 / 1123 label)
MAX_NAME = 63


def is_custom(doc: dict[str, Any]) -> bool:
    """True for the custom resources whose CRDs are known (:data:`CRD_FILES`)."""
    return (doc["apiVersion"].partition("/")[0], doc["kind"]) in CRD_FILES


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that does not say otherwise."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


@cache
def crd_schema(crds: Path, group: str, kind: str, version: str) -> dict[str, Any]:
    """The closed openAPIV3 schema of ``group``/``version`` ``kind`` from the CRD file under ``crds``."""
    crd = yaml.safe_load((crds / CRD_FILES[(group, kind)]).read_text())
    versions = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not versions:
        raise ValueError(f"{kind}: the CRD serves no version {version!r}")
    schema = copy.deepcopy(versions[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not the CRD's
    return closed(schema)


def validate(doc: dict[str, Any], crds: Path) -> None:
    """Raise when ``doc`` does not validate (``jsonschema.ValidationError`` or kubernetes-validate's error)."""
    name = doc.get("metadata", {}).get("name", "")
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"{doc['kind']}: metadata.name {name!r} must have 1 to {MAX_NAME} characters")
    if is_custom(doc):
        import jsonschema

        group, _, version = doc["apiVersion"].partition("/")
        jsonschema.validate(doc, crd_schema(crds, group, doc["kind"], version))
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def validate_all(docs: list[dict[str, Any]], crds: Path) -> list[str]:
    """One line per resource that fails (empty when all validate): ``Kind/name: the first error``."""
    errors = []
    for doc in docs:
        try:
            validate(doc, crds)
        except Exception as exc:  # jsonschema's, kubernetes-validate's or ours: each names the field
            message = getattr(exc, "message", None) or str(exc).splitlines()[0]
            errors.append(f"{doc['kind']}/{doc.get('metadata', {}).get('name')}: {message}")
    return errors
