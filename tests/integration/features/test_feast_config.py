"""Feast configuration: everything under Layout.feast, any working directory, online store switch."""

from __future__ import annotations

import socket

import pytest

from features.config import Layout
from features.store import (
    FeatureStoreError,
    feature_store,
    is_registered,
    register,
    registry_location,
    repo_config,
)


def test_paths_live_under_the_layout_not_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("AFM_FEAST_ONLINE", raising=False)
    monkeypatch.delenv("AFM_FEAST_REGISTRY", raising=False)
    layout = Layout(tmp_path / "home")
    cfg = repo_config(layout)
    assert cfg.project == "activityfm"
    assert cfg.registry.path == str(layout.feast / "registry.db")
    assert cfg.online_store.type == "sqlite" and cfg.online_store.path == str(layout.feast / "online.db")
    assert cfg.repo_path == layout.feast


def test_register_from_another_cwd_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.delenv("AFM_FEAST_ONLINE", raising=False)
    monkeypatch.delenv("AFM_FEAST_REGISTRY", raising=False)
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
    assert {fv.name for fv in fs.list_feature_views()} == {
        "user_sequence",
        "user_realtime_sequence",
        "item_features",
        "user_embedding",
    }
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


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://feast:s3cret@pg.internal:5432/feast",
        "postgres://feast:s3cret@pg.internal:5432/feast",
        "postgresql+psycopg2://feast:s3cret@pg.internal:5432/feast",
    ],
)
def test_sql_registry_setting_uses_the_installed_postgres_driver(tmp_path, monkeypatch, given):
    monkeypatch.setenv("AFM_FEAST_REGISTRY", given)
    layout = Layout(tmp_path)
    cfg = repo_config(layout)
    assert cfg.registry.registry_type == "sql"
    assert cfg.registry.path == "postgresql+psycopg2://feast:s3cret@pg.internal:5432/feast"  # psycopg2, not psycopg 3
    assert cfg.registry.cache_ttl_seconds == 60
    assert registry_location(layout) == "postgresql+psycopg2://feast:***@pg.internal:5432/feast"


@pytest.mark.parametrize("given", ["mysql://feast@db/feast", "redis://cache:6379", "/data/feast/registry.db"])
def test_unsupported_registry_url_is_named(tmp_path, monkeypatch, given):
    monkeypatch.setenv("AFM_FEAST_REGISTRY", given)
    with pytest.raises(FeatureStoreError, match=r"AFM_FEAST_REGISTRY must be a SQLAlchemy URL of PostgreSQL"):
        repo_config(Layout(tmp_path))


def test_sql_registry_is_shared_by_data_roots_and_no_file_is_written(tmp_path, monkeypatch):
    """With a SQL registry (SQLite here; PostgreSQL in test_feast_sql_registry.py) a second data root sees the views."""
    monkeypatch.delenv("AFM_FEAST_ONLINE", raising=False)
    monkeypatch.setenv("AFM_FEAST_REGISTRY", f"sqlite:///{tmp_path / 'registry.sqlite'}")
    first, second = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    assert not is_registered(first) and not is_registered(second)
    summary = register(first)
    assert summary["registry"] == f"sqlite:///{tmp_path / 'registry.sqlite'}"
    assert is_registered(second)
    assert {fv.name for fv in feature_store(second).list_feature_views()} == set(summary["feature_views"])
    assert not (first.feast / "registry.db").exists() and not (second.feast / "registry.db").exists()
    monkeypatch.delenv("AFM_FEAST_REGISTRY")
    assert not is_registered(second)  # back to the file registry, which second never had


def test_unreachable_sql_registry_is_named_without_its_password(tmp_path, monkeypatch):
    from serving.online_features import FeastOnlineFeatures

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AFM_FEAST_REGISTRY", f"postgresql://feast:s3cret@127.0.0.1:{port}/feast")
    layout = Layout(tmp_path)
    with pytest.raises(
        FeatureStoreError, match=rf"SQL registry at postgresql\+psycopg2://feast:\*\*\*@127.0.0.1:{port}/feast"
    ) as err:
        is_registered(layout)
    assert "s3cret" not in str(err.value)
    status = FeastOnlineFeatures(layout).status()  # /health reports it instead of failing
    assert "cannot be read" in status and "s3cret" not in status
