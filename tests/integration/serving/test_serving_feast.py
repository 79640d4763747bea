"""Scoring service and embedding publisher over a real Feast store (SQLite online, parquet offline)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from features.contract import CONTENT_DIM, ITEM_SCHEMA
from features.store import feature_store, materialize, register, snapshot_timestamp
from features.tables import USER_SEQUENCES_SCHEMA
from serving.app import create_app
from serving.embeddings import publish_user_embeddings

DS = "2026-01-05"
UTC = dt.UTC
T = dt.datetime(2026, 1, 5, 8, tzinfo=UTC)

SEQUENCES = [
    {"user_id": 1, "item_ids": [10, 11], "actions": ["click", "save"], "surfaces": ["home", "search"]},
    {"user_id": 2, "item_ids": [12], "actions": ["hide"], "surfaces": ["related"]},
    {"user_id": 3, "item_ids": [10, 12, 13], "actions": ["click", "click", "share"], "surfaces": ["home"] * 3},
]


def _content(i: int) -> list[float]:
    return [float(i % 5) / 5.0] * CONTENT_DIM


ITEMS = [
    {"item_id": i, "created_at": dt.datetime(2025, 12, 1, tzinfo=UTC), "category": "c", "content": _content(i)}
    for i in range(10, 16)
]


class SeqModel:
    """Deterministic double of ServingModel: embedding = [n_events, sum(item_ids)]; click ∝ item_id."""

    actions = ("click", "save", "hide")
    embedding_dim = 2

    def __init__(self, version: str) -> None:
        self.version = version
        self.last_embedding: np.ndarray | None = None
        self.last_content: dict | None = None

    def user_embeddings(self, sequences):
        return np.array([[len(s["item_ids"]), sum(s["item_ids"])] for s in sequences], np.float32)  # (U, 2)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None):
        self.last_embedding, self.last_content = np.asarray(user_embedding), content
        p = np.asarray(candidates, np.float32) / 100.0  # (C,)
        return np.stack([p, p, 1 - p], axis=1)  # (C, 3)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    lay = Layout(tmp_path_factory.mktemp("afm_serving"))
    rows = [{**r, "ts": [T] * len(r["item_ids"]), "last_ts": T, "n_events": len(r["item_ids"])} for r in SEQUENCES]
    snap = pa.Table.from_pylist(rows, schema=USER_SEQUENCES_SCHEMA)
    part = lay.partition(lay.user_sequences, DS)
    part.mkdir(parents=True)
    pq.write_table(snap, part / "part-00000.parquet")
    lay.items.mkdir(parents=True)
    items = pa.Table.from_pylist(ITEMS, schema=ITEM_SCHEMA)
    pq.write_table(items, lay.items / "items.parquet")

    # The Feast offline sources as export_feast_sources lays them out (without Spark, to stay fast).
    seq_src = lay.feast / "sources" / "user_sequence" / DS
    seq_src.mkdir(parents=True)
    n = snap.num_rows
    src = snap.select(["user_id", "item_ids", "actions", "surfaces", "n_events"]).append_column(
        "event_timestamp", pa.array([snapshot_timestamp(DS)] * n, pa.timestamp("us", tz="UTC"))
    )
    pq.write_table(src, seq_src / "part-00000.parquet")
    item_src = lay.feast / "sources" / "item_features"
    item_src.mkdir(parents=True)
    created = items.column("created_at")
    item_table = pa.table(
        {
            "item_id": items.column("item_id"),
            "category": items.column("category"),
            "content": items.column("content"),
            "created_at_s": pa.array([int(t.timestamp()) for t in created.to_pylist()], pa.int64()),
            "event_timestamp": created,
        }
    )
    pq.write_table(item_table, item_src / "part-00000.parquet")
    register(lay)
    materialize(lay, end_ds=DS)
    return lay


def _online_embeddings(layout: Layout, users: list[int]) -> dict:
    return (
        feature_store(layout)
        .get_online_features(
            features=["user_embedding:embedding", "user_embedding:model_version"],
            entity_rows=[{"user_id": u} for u in users],
        )
        .to_dict()
    )


def test_publish_then_rank_uses_precomputed_only_for_the_same_version(layout):
    out = publish_user_embeddings(layout, model_loader=lambda: SeqModel("r1"), batch_size=2)
    assert out["model_version"] == "r1" and out["n_users"] == 3 and out["ds"] == DS
    got = _online_embeddings(layout, [1, 2, 3])
    assert got["model_version"] == ["r1"] * 3
    assert got["embedding"][0] == pytest.approx([2.0, 21.0])
    assert got["embedding"][2] == pytest.approx([3.0, 35.0])

    # Same version: the stored embedding is used.
    model_r1 = SeqModel("r1")
    client = TestClient(create_app(layout, model_loader=lambda: model_r1))
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["feature_store"] == "ok"
    r = client.post("/v1/rank", json={"user_id": 3, "candidates": [11, 15, 10], "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_source"] == "precomputed" and body["user_known"] is True
    assert [it["item_id"] for it in body["items"]] == [15, 11, 10]
    # candidate content came from the item_features view
    assert model_r1.last_content[15] == pytest.approx(_content(15))

    # Another version is served (e.g. after a rollback): computed from the stored sequence instead.
    model_r2 = SeqModel("r2")
    client = TestClient(create_app(layout, model_loader=lambda: model_r2))
    body = client.post("/v1/rank", json={"user_id": 3, "candidates": [11], "surface": "home"}).json()
    assert body["embedding_source"] == "computed" and body["model_version"] == "r2"
    np.testing.assert_allclose(model_r2.last_embedding, [3.0, 35.0])

    body = client.post("/v1/rank", json={"user_id": 404, "candidates": [11, 99], "surface": "search"}).json()
    assert body["user_known"] is False and body["embedding_source"] == "computed"
    np.testing.assert_allclose(model_r2.last_embedding, [0.0, 0.0])
    assert 99 not in model_r2.last_content  # unknown item: no content passed

    # Publishing r2 replaces what the online store serves.
    publish_user_embeddings(layout, model_loader=lambda: SeqModel("r2"))
    assert _online_embeddings(layout, [1])["model_version"] == ["r2"]
    body = client.post("/v1/rank", json={"user_id": 3, "candidates": [11], "surface": "home"}).json()
    assert body["embedding_source"] == "precomputed"


def test_real_serving_model_through_the_service(layout):
    try:
        import torch

        from training.interaction import InteractionConfig
        from training.model import PinFMConfig
        from training.ranker import Ranker, RankerConfig
        from training.serving_model import ServingModel
    except ImportError as exc:  # the training package is developed in parallel
        pytest.skip(f"training package not importable: {exc}")
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=PinFMConfig.preset("tiny"), interaction=InteractionConfig(mlp_hidden=(16,))))
    model = ServingModel(ranker, "tiny-0")
    client = TestClient(create_app(layout, model_loader=lambda: model))
    r = client.post("/v1/rank", json={"user_id": 1, "candidates": [10, 11, 12, 77], "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_source"] == "computed"  # no tiny-0 embeddings were published
    assert sorted(it["item_id"] for it in body["items"]) == [10, 11, 12, 77]
    assert set(body["items"][0]["scores"]) == set(model.actions)
    assert all(0.0 <= it["score"] <= 1.0 for it in body["items"])
