"""``afm k8s render | validate``: the kustomize tree of ``infra/k8s`` without kubectl, checked offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

#: where each kind of job template keeps its ``afm`` arguments
ARGS_PATHS = {"TrainJob": ("spec", "trainer", "args"), "SparkApplication": ("spec", "arguments")}


def fill_day(docs: list[dict[str, Any]], ds: str) -> list[dict[str, Any]]:
    """The job templates of ``docs`` for day ``ds``: ``DS`` replaced in their arguments, the day in their names."""
    from afm.kubernetes_profile import DS_PLACEHOLDER

    for doc in docs:
        path = ARGS_PATHS.get(doc["kind"])
        if path is None:
            continue
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = [ds if a == DS_PLACEHOLDER else a for a in node.get(path[-1], [])]
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{ds}"[:63]
    return docs


@click.group("k8s")
def k8s() -> None:
    """The Kubernetes manifests (infra/k8s): render an overlay, validate it offline."""


@k8s.command("render")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ds", default=None, help="Fill the job templates for this day (YYYY-MM-DD).")
@click.option("--image-tag", default=None, help="Set the tag of every ActivityFM image.")
def render_cmd(folder: Path, ds: str | None, image_tag: str | None) -> None:
    """Print the manifests of a kustomization FOLDER (what `kubectl kustomize FOLDER` prints).

    Example: afm k8s render infra/k8s/overlays/prod --ds 2026-01-05 | kubectl apply -f -
    """
    from afm.kubernetes_profile import with_tag
    from afm.kustomize import render, split_image
    from features.config import parse_ds

    docs = render(folder)
    if ds:
        parse_ds(ds)
        fill_day(docs, ds)
    if image_tag:
        for doc in docs:
            _retag(doc, lambda ref: with_tag(ref, image_tag) if _ours(split_image(ref)[0]) else ref)
    click.echo("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs), nl=False)


@k8s.command("validate")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--crds", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the upstream CRD files (TrainJob, SparkApplication, InferenceService).")  # fmt: skip
def validate_cmd(folder: Path, crds: Path) -> None:
    """Validate every manifest of FOLDER offline; exit 1 naming each resource and field that fails."""
    from afm.k8s_validate import validate_all
    from afm.kustomize import render

    docs = render(folder)
    errors = validate_all(docs, crds)
    for line in errors:
        click.echo(f"invalid: {line}", err=True)
    click.echo(f"k8s validate: {len(docs) - len(errors)}/{len(docs)} resources of {folder} valid")
    if errors:
        raise SystemExit(1)


def _ours(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in ("activityfm", "activityfm-cuda")


def _retag(node: Any, change: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                node[key] = change(value)
            else:
                _retag(value, change)
    elif isinstance(node, list):
        for item in node:
            _retag(item, change)
