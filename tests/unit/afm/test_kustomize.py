"""The project's kustomize renderer: kustomize's meaning for the fields it supports, a clear refusal for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from afm.kustomize import KustomizeError, render, strategic_merge

DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - {name: app, image: shop/web:1, args: [serve]}
        - {name: sidecar, image: proxy:2}
"""
JOB = """apiVersion: example.io/v1
kind: Thing
metadata: {name: t}
spec:
  image: shop/web:1
  items: [{name: a, size: 1}, {name: b, size: 2}]
"""


def _tree(tmp_path: Path, overlay: str) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "app.yaml").write_text(DEPLOYMENT + "---\n" + JOB)
    (tmp_path / "base" / "conf.yaml").write_text("images: [{kind: Thing, path: spec/image}]\n")
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [app.yaml]\nconfigurations: [conf.yaml]\n")
    (tmp_path / "over").mkdir()
    (tmp_path / "over" / "kustomization.yaml").write_text(overlay)
    return tmp_path / "over"


def test_overlay_sets_namespace_labels_images_and_merges_patches(tmp_path: Path) -> None:
    over = _tree(tmp_path, "resources: [../base]\nnamespace: ns\nlabels: [{pairs: {env: dev}, includeTemplates: true}]\n"
                           "images: [{name: shop/web, newName: reg/web, newTag: '7'}]\npatches: [{path: p.yaml}, {path: q.yaml}]\n")  # fmt: skip
    (over / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
                                 "spec: {template: {spec: {containers: [{name: app, args: [run]}]}}}\n")  # fmt: skip
    (over / "q.yaml").write_text(
        "apiVersion: example.io/v1\nkind: Thing\nmetadata: {name: t}\nspec: {items: [{name: a, size: 9}]}\n"
    )
    web, thing = render(over)
    app, sidecar = web["spec"]["template"]["spec"]["containers"]
    assert app == {"name": "app", "image": "reg/web:7", "args": ["run"]}  # merged by name, image retagged
    assert sidecar["image"] == "proxy:2"
    assert web["metadata"] == {"name": "web", "namespace": "ns", "labels": {"env": "dev"}}
    assert web["spec"]["template"]["metadata"]["labels"] == {"env": "dev"}
    assert thing["spec"]["image"] == "reg/web:7"  # the base's configurations reach the overlay's images
    assert thing["spec"]["items"] == [{"name": "a", "size": 9}]  # a custom resource's list is replaced whole


def test_an_unsupported_field_is_refused_by_name(tmp_path: Path) -> None:
    over = _tree(tmp_path, "resources: [../base]\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match=r"unsupported kustomization field\(s\) \['namePrefix'\]"):
        render(over)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(KustomizeError, match="'missing.yaml' does not exist"):
        render(tmp_path / "c")


def test_a_patch_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    over = _tree(
        tmp_path,
        "resources: [../base]\npatches: [{patch: 'apiVersion: v1\n\n  kind: Service\n\n  metadata: {name: web}'}]\n",
    )
    with pytest.raises(KustomizeError, match="matches no resource"):
        render(over)


def test_strategic_merge_deletes_with_null_and_appends_new_items() -> None:
    base = {"a": 1, "b": {"c": 2}, "l": [{"name": "x", "v": 1}]}
    out = strategic_merge(base, {"a": None, "b": {"d": 3}, "l": [{"name": "y", "v": 2}]})
    assert out == {"b": {"c": 2, "d": 3}, "l": [{"name": "x", "v": 1}, {"name": "y", "v": 2}]}
    assert base["a"] == 1  # the input is not changed
