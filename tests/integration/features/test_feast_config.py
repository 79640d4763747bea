"""Feast configuration: everything under Layout.feast, any working directory, online store switch."""

from __future__ import annotations

import pytest

from features.config import Layout
from features.store import FeatureStoreError, feature_store, is_registered, register, repo_config


def test_paths_live_under_the_layout_not_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("AFM_FEAST_ONLINE", raising=False)
    layout = Layout(tmp_path / "home")
    cfg = repo_config(layout)
    assert cfg.project == "activityfm"
    assert cfg.registry.path == str(layout.feast / "registry.db")
    assert cfg.online_store.type == "sqlite" and cfg.online_store.path == str(layout.feast / "online.db")
    assert cfg.repo_path == layout.feast


def test_register_from_another_cwd_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.delenv("AFM_FEAST_ONLINE", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    layout = Layout(tmp_path / "home")
    assert not is_registered(layout)
    first = register(layout)
    assert is_registered(layout)
    assert register(layout) == first
    assert first["feature_services"] == ["ranking_item", "ranking_user"]
    assert list(elsewhere.iterdir()) == []  # nothing written into the working directory
    fs = feature_store(layout)
    assert {fv.name for fv in fs.list_feature_views()} == {"user_sequence", "item_features", "user_embedding"}
    # sources are stored relative, so the registry does not pin this machine's paths
    assert fs.get_data_source("user_sequence_source").path == "sources/user_sequence"


def test_redis_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("AFM_FEAST_ONLINE", "redis")
    monkeypatch.setenv("AFM_REDIS_URL", "redis://cache.internal:6380")
    cfg = repo_config(Layout(tmp_path))
    assert cfg.online_store.type == "redis"
    assert cfg.online_store.connection_string == "cache.internal:6380"


def test_unknown_online_store_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("AFM_FEAST_ONLINE", "dynamo")
    with pytest.raises(FeatureStoreError, match="AFM_FEAST_ONLINE must be 'sqlite' or 'redis', got 'dynamo'"):
        repo_config(Layout(tmp_path))
