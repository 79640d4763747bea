"""Render a kustomization (``infra/k8s/base``, ``infra/k8s/overlays/*``) without the kustomize binary.

The DAGs' kubernetes profile renders the overlay to find the job templates it fills per day,
inside an image that has no ``kubectl``; tests and users without ``kubectl`` render with
``afm k8s render``. Only the kustomization fields ActivityFM uses are supported, each with
kustomize's meaning, and any other field is refused by name (so nothing is silently
ignored); where ``kubectl`` is installed a test checks that both renderings are equal.

Supported: ``resources`` (files, and folders holding a kustomization), ``namespace`` (also
on the service-account subjects of role bindings),
``labels`` (``pairs``, ``includeTemplates``; not ``includeSelectors``), ``images``
(``name``, ``newName``, ``newTag``, ``digest``) on every ``containers[].image`` and
``initContainers[].image`` and on the paths of ``configurations`` files, and ``patches``
(strategic-merge patches by ``path`` or inline ``patch``, with or without ``target``). As in
kustomize, a patch merges the lists of a built-in kind's objects by their merge key
(containers by ``name``, …) and replaces the lists of a custom resource whole (no schema).

Example:
    >>> docs = render(Path("infra/k8s/overlays/dev"))  # doctest: +SKIP
    >>> [d["kind"] for d in docs][:2]  # doctest: +SKIP
    ['ConfigMap', 'PersistentVolumeClaim']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches", "configurations"}
#: kinds that live outside namespaces (kustomize leaves their metadata.namespace unset)
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "ClusterTrainingRuntime",
}  # fmt: skip
#: API groups of Kubernetes' own kinds that have a dot in their name (core, apps, batch, … have none)
BUILT_IN_GROUPS = {
    "rbac.authorization.k8s.io", "networking.k8s.io", "storage.k8s.io", "scheduling.k8s.io",
    "apiextensions.k8s.io", "admissionregistration.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "node.k8s.io", "certificates.k8s.io", "flowcontrol.apiserver.k8s.io",
}  # fmt: skip
#: keys by which strategic merge pairs the items of a list of objects (kustomize's defaults without a schema)
MERGE_KEYS = ("name", "mountPath", "devicePath", "ip", "type", "topologyKey", "containerPort")


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render, with the file and the field named."""


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in ``folder``, transformed as kustomize would."""
    return _render(Path(folder))[0]


def _render(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(resources, image field specs): a base's ``configurations`` also hold in the overlays above it."""
    spec_file = Path(folder) / KUSTOMIZATION
    if not spec_file.exists():
        raise KustomizeError(f"{folder}: no {KUSTOMIZATION}")
    spec = yaml.safe_load(spec_file.read_text()) or {}
    unknown = sorted(set(spec) - SUPPORTED)
    if unknown:
        raise KustomizeError(
            f"{spec_file}: unsupported kustomization field(s) {unknown} (supported: {sorted(SUPPORTED)})"
        )
    docs: list[dict[str, Any]] = []
    image_paths = [fs for c in spec.get("configurations", []) for fs in _configuration(folder / c)]
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            base_docs, base_paths = _render(path)
            docs.extend(base_docs)
            image_paths.extend(base_paths)
        elif path.exists():
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
        else:
            raise KustomizeError(f"{spec_file}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        _apply_patch(docs, patch, folder, spec_file)
    for image in spec.get("images", []):
        for doc in docs:
            _set_images(doc, image, image_paths)
    for label in spec.get("labels", []):
        if label.get("includeSelectors"):
            raise KustomizeError(f"{spec_file}: labels with includeSelectors are not supported")
        for doc in docs:
            _add_labels(doc, label["pairs"], bool(label.get("includeTemplates")))
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
            for subject in doc.get("subjects", []) if doc["kind"] in ("RoleBinding", "ClusterRoleBinding") else []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace", "default") == "default":
                    subject["namespace"] = spec["namespace"]  # the service account moved with the namespace
    return docs, image_paths


def render_text(folder: Path) -> str:
    """:func:`render` as a YAML stream (``---`` between resources), like ``kubectl kustomize``."""
    return "---\n".join(yaml.safe_dump(d, sort_keys=True) for d in render(folder))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one resource of ``kind`` named ``name`` (a deep copy, free to fill)."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        raise KustomizeError(f"expected one {kind} named {name!r}, found {len(found)}")
    return copy.deepcopy(found[0])


def strategic_merge(base: Any, patch: Any, merge_lists: bool = True) -> Any:
    """``patch`` merged into ``base``: maps key by key, ``null`` deletes, lists of objects by merge key.

    With ``merge_lists``, lists whose items all carry the same merge key (``name``,
    ``mountPath``, …) are merged item by item, new items appended; any other list is replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(base[key], value, merge_lists) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(base + patch) if merge_lists else None
        if key is None:
            return copy.deepcopy(patch)
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            at = [i for i, b in enumerate(out) if b.get(key) == item.get(key)]
            if at:
                out[at[0]] = strategic_merge(out[at[0]], item, merge_lists)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _merge_key(items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    return next((k for k in MERGE_KEYS if all(k in i for i in items)), None)


def _apply_patch(docs: list[dict[str, Any]], entry: dict[str, Any], folder: Path, spec_file: Path) -> None:
    if "path" in entry:
        body = yaml.safe_load((folder / entry["path"]).read_text())
    elif "patch" in entry:
        body = yaml.safe_load(entry["patch"])
    else:
        raise KustomizeError(f"{spec_file}: a patch needs 'path' or 'patch'")
    if isinstance(body, list):
        raise KustomizeError(f"{spec_file}: JSON6902 patches are not supported; write a strategic-merge patch")
    target = entry.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    hits = [
        i for i, d in enumerate(docs)
        if d["kind"] == target.get("kind", d["kind"]) and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
    ]  # fmt: skip
    if not hits:
        raise KustomizeError(f"{spec_file}: patch target {target} matches no resource")
    for i in hits:
        own = copy.deepcopy(body)
        own.get("metadata", {}).pop("name", None)  # a targeted patch keeps the resource's name
        docs[i] = strategic_merge(docs[i], own, merge_lists=_built_in(docs[i]))


def _built_in(doc: dict[str, Any]) -> bool:
    """A kind of Kubernetes itself (core, apps, batch, rbac, …), not a custom resource."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group in BUILT_IN_GROUPS


def _configuration(path: Path) -> list[dict[str, str]]:
    conf = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(conf) - {"images"})
    if unknown:
        raise KustomizeError(f"{path}: unsupported configuration field(s) {unknown}")
    return conf.get("images", [])


def split_image(ref: str) -> tuple[str, str]:
    """``name:tag`` or ``name@digest`` → (name, the rest with its separator)."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, "@" + digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return (ref[:colon], ref[colon:]) if colon > slash else (ref, "")


def _new_image(ref: str, image: dict[str, str]) -> str:
    name, rest = split_image(ref)
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + rest


def _set_images(doc: dict[str, Any], image: dict[str, str], paths: list[dict[str, str]]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for c in value:
                        if isinstance(c, dict) and isinstance(c.get("image"), str):
                            c["image"] = _new_image(c["image"], image)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    for fs in paths:
        if fs.get("kind", doc["kind"]) != doc["kind"]:
            continue
        *parents, leaf = fs["path"].split("/")
        node: Any = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = _new_image(node[leaf], image)


def _add_labels(doc: dict[str, Any], pairs: dict[str, str], templates: bool) -> None:
    doc.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    template = doc.get("spec", {}).get("template") if templates else None
    if isinstance(template, dict):
        template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
