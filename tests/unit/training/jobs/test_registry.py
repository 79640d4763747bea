"""Model registry: versions, promote, rollback, listing."""

from __future__ import annotations

import json

import pytest
import torch

from features.config import Layout
from serving.model import load_ranker
from training.jobs.registry import (
    RegistryError,
    current_version,
    list_versions,
    load_artifact,
    promote,
    rollback,
    save_artifact,
)


def _save(layout: Layout, auc: float) -> str:
    return save_artifact(layout, "ranker", {"w": torch.tensor([auc])}, {"x": 1}, {"auc_click": auc}, {"eval_day": "d"})


def test_save_writes_all_files_and_sortable_versions(tmp_path) -> None:
    layout = Layout(tmp_path)
    versions = [_save(layout, a) for a in (0.6, 0.6, 0.7)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    for v in versions:
        d = layout.models / "ranker" / v
        assert {p.name for p in d.iterdir()} >= {"model.pt", "config.json", "metrics.json", "data_version.json"}
        assert v.startswith("v") and len(v.split("-")[-1]) == 6
    art = load_artifact(layout, "ranker", versions[2])
    assert float(art["state_dict"]["w"]) == pytest.approx(0.7)
    assert art["metrics"]["auc_click"] == 0.7 and art["data_version"] == {"eval_day": "d"}
    with pytest.raises(ValueError, match="unknown artifact kind 'foo'"):
        save_artifact(layout, "foo", {}, {}, {}, {})


def test_promote_rollback_and_list(tmp_path) -> None:
    layout = Layout(tmp_path)
    v1, v2, v3 = (_save(layout, a) for a in (0.6, 0.65, 0.7))
    assert current_version(layout) is None
    with pytest.raises(RegistryError, match="nothing is promoted"):
        rollback(layout)
    promote(layout, v1)
    with pytest.raises(RegistryError, match="no previously promoted"):
        rollback(layout)
    promote(layout, v2)
    out = promote(layout, v3)
    assert out["previous"] == v2 and current_version(layout) == v3
    rows = list_versions(layout)
    assert [r["version"] for r in rows] == [v1, v2, v3]
    assert [r["current"] for r in rows] == [False, False, True]
    assert rows[0]["metrics"]["auc_click"] == 0.6
    assert rollback(layout)["version"] == v2
    assert rollback(layout)["version"] == v1  # a second rollback goes further back, it does not toggle
    with pytest.raises(RegistryError, match="no previously promoted"):
        rollback(layout)
    assert current_version(layout) == v1
    history = [json.loads(x) for x in (layout.models / "ranker" / "HISTORY").read_text().splitlines()]
    assert [h["event"] for h in history] == ["promote", "promote", "promote", "rollback", "rollback"]
    with pytest.raises(RegistryError, match="no ranker version 'v0-nope'"):
        promote(layout, "v0-nope")


def test_load_ranker_without_current_names_the_path(tmp_path) -> None:
    layout = Layout(tmp_path)
    with pytest.raises(RegistryError, match=str(layout.models / "ranker" / "CURRENT")):
        load_ranker(layout)
