"""Scoring service and embedding publisher over a real Feast store (parquet offline; online: SQLite, then Redis).

The tests that read the online store run once per store (``online_store`` in tests/integration/conftest.py).
"""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from features.contract import CONTENT_DIM, ITEM_SCHEMA
from features.feature_repo import definitions as defs
from features.store import FeatureStoreError, feature_store, materialize, register, snapshot_timestamp
from features.tables import USER_SEQUENCES_SCHEMA
from serving.app import create_app
from serving.embeddings import iter_sequence_batches, publish_user_embeddings
from serving.online_features import FeastOnlineFeatures

DS = "2026-01-05"
UTC = dt.UTC
T = dt.datetime(2026, 1, 5, 8, tzinfo=UTC)


def _at(*offsets_s: int) -> list[dt.datetime]:
    """Event times ``T + offset`` (seconds), oldest first."""
    return [T + dt.timedelta(seconds=s) for s in offsets_s]


USER_1 = {"item_ids": [10, 11], "actions": ["click", "save"], "surfaces": ["home", "search"]}
SEQUENCES = [
    {"user_id": 1, **USER_1, "ts": _at(-3600, 0)},
    {"user_id": 2, "item_ids": [12], "actions": ["hide"], "surfaces": ["related"], "ts": _at(0)},
    {
        "user_id": 3,
        "item_ids": [10, 12, 13],
        "actions": ["click", "click", "share"],
        "surfaces": ["home"] * 3,
        "ts": _at(-7200, -60, 0),
    },
    {"user_id": 4, **USER_1, "ts": _at(-2 * 86_400, 0)},  # user 1's events two days apart: only the gap differs
    {"user_id": 5, **USER_1, "ts": _at(-3600, 0)},  # user 1's events, but its online row has no times
]
NO_ONLINE_TIMES = {5}


def _unix_seconds(times: list[dt.datetime]) -> list[int]:
    return [int(t.timestamp()) for t in times]


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
def layout(tmp_path_factory, online_store) -> Layout:
    lay = Layout(tmp_path_factory.mktemp(f"afm_serving_{online_store.kind}"))
    rows = [{**r, "last_ts": r["ts"][-1], "n_events": len(r["item_ids"])} for r in SEQUENCES]
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
    event_ts = [None if r["user_id"] in NO_ONLINE_TIMES else _unix_seconds(r["ts"]) for r in rows]
    src = (
        snap.select(["user_id", "item_ids", "actions", "surfaces", "n_events"])
        .append_column(defs.EVENT_TS_FIELD, pa.array(event_ts, pa.list_(pa.int64())))
        .append_column("event_timestamp", pa.array([snapshot_timestamp(DS)] * n, pa.timestamp("us", tz="UTC")))
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
    assert out["model_version"] == "r1" and out["n_users"] == len(SEQUENCES) and out["ds"] == DS
    got = _online_embeddings(layout, [1, 2, 3])
    assert got["model_version"] == ["r1"] * 3
    assert got["embedding"][0] == pytest.approx([2.0, 21.0])
    assert got["embedding"][2] == pytest.approx([3.0, 35.0])

    # Same version: the stored embedding is used.
    model_r1 = SeqModel("r1")
    client = TestClient(create_app(layout, model_loader=lambda: model_r1, warm_up_in_background=False))
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["feature_store"] == "ok"
    assert health.json()["status"] == "ok"
    r = client.post("/v1/rank", json={"user_id": 3, "candidates": [11, 15, 10], "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_source"] == "precomputed" and body["user_known"] is True
    assert [it["item_id"] for it in body["items"]] == [15, 11, 10]
    # candidate content came from the item_features view
    assert model_r1.last_content[15] == pytest.approx(_content(15))

    # Another version is served (e.g. after a rollback): computed from the stored sequence instead.
    model_r2 = SeqModel("r2")
    # warmed before it returns: a background warm-up's own scoring pass would race the fake's last_* fields
    client = TestClient(create_app(layout, model_loader=lambda: model_r2, warm_up_in_background=False))
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


def test_warm_up_opens_the_feast_store(layout):
    features = FeastOnlineFeatures(layout)
    assert not features.is_open
    features.warm_up()
    assert features.is_open


def test_warm_up_without_a_registry_names_the_fix(tmp_path):
    features = FeastOnlineFeatures(Layout(tmp_path))
    with pytest.raises(FeatureStoreError, match="run `afm features register`"):
        features.warm_up()
    assert not features.is_open


def test_service_is_ready_once_the_store_is_open(layout):
    features = FeastOnlineFeatures(layout)
    client = TestClient(
        create_app(layout, model_loader=lambda: SeqModel("r1"), online_features=features, warm_up_in_background=False)
    )
    deadline = time.monotonic() + 60
    while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/v2/health/ready").status_code == 200
    assert features.is_open  # opened by the warm-up, not by the first request


def test_real_serving_model_through_the_service(layout):
    import torch

    from serving.model import ServingModel
    from training.model.backbone import PinFMConfig
    from training.model.interaction import InteractionConfig
    from training.model.ranker import Ranker, RankerConfig

    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=PinFMConfig.preset("tiny"), interaction=InteractionConfig(mlp_hidden=(16,))))
    model = ServingModel(ranker, "tiny-0")
    client = TestClient(create_app(layout, model_loader=lambda: model, warm_up_in_background=False))
    r = client.post("/v1/rank", json={"user_id": 1, "candidates": [10, 11, 12, 77], "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_source"] == "computed"  # no tiny-0 embeddings were published
    assert sorted(it["item_id"] for it in body["items"]) == [10, 11, 12, 77]
    assert set(body["items"][0]["scores"]) == set(model.actions)
    assert all(0.0 <= it["score"] <= 1.0 for it in body["items"])


# ------------------------------------------------------------------ event times → time gaps
CANDIDATES = [10, 11, 12, 77]  # 77: not in the catalogue (no content)


def _tiny_ranker(sequence: str, time_gaps: bool):
    import torch

    from training.model.backbone import PinFMConfig
    from training.model.interaction import InteractionConfig
    from training.model.ranker import Ranker, RankerConfig

    torch.manual_seed(0)
    cfg = RankerConfig(
        backbone=PinFMConfig.preset("tiny"),
        sequence=sequence,
        time_gaps=time_gaps,
        interaction=InteractionConfig(mlp_hidden=(16,)),
    )
    return Ranker(cfg).eval()


def _serving_model(ranker, layout: Layout, version: str):
    from serving.model import ServingModel
    from training.data import ContentTable, ItemCreatedAt

    content = ContentTable.from_layout(layout, ranker.cfg.backbone.content_dim)
    return ServingModel(ranker, version, content, ItemCreatedAt.from_layout(layout))


def _offline_probs(ranker, layout: Layout, user_id: int, with_ts: bool = True) -> np.ndarray:
    """Offline batch scoring (``finetune.batch_tensors``, as evaluation) of the user's snapshot row → (C, A)."""
    import torch

    from features.contract import LABEL_ACTIONS, SURFACE_IDS
    from training.data import ContentTable, ItemCreatedAt, RankingData, encode_sequence_frame, read_partition
    from training.jobs.finetune import ItemFacts, batch_tensors
    from training.model.inputs import history_len
    from training.model.ranker_objective import ranker_logits

    snap = read_partition(layout.user_sequences, DS)
    row = snap[snap["user_id"] == user_id].reset_index(drop=True)
    if not with_ts:
        row = row.drop(columns=["ts"])
    seqs = encode_sequence_frame(row, history_len(ranker.cfg))  # ts (1, L) seconds from the snapshot's datetimes
    assert (seqs.ts is not None) == with_ts
    C = len(CANDIDATES)
    data = RankingData(
        sequences=seqs,
        request_ids=np.array(["r0"]),
        req_index=np.zeros(C, np.int64),
        item_ids=np.asarray(CANDIDATES, np.int64),
        surface_ids=np.full(C, SURFACE_IDS["home"], np.int64),
        labels=np.zeros((C, len(LABEL_ACTIONS)), np.float32),
        days=[DS],
        request_ts=np.array([int(T.timestamp())], np.int64),
    )
    content = ContentTable.from_layout(layout, ranker.cfg.backbone.content_dim)
    b = batch_tensors(data, np.arange(C), ItemFacts(content, ItemCreatedAt.from_layout(layout)), torch.device("cpu"))
    assert ("ts" in b["seq"]) == with_ts
    with torch.no_grad():
        logits = ranker_logits(ranker, b)  # (1, C, A), candidates in CANDIDATES order
    return torch.sigmoid(logits[0]).numpy()  # (C, A)


def _served_probs(client: TestClient, model, user_id: int, source: str = "computed") -> np.ndarray:
    """``POST /v1/rank`` → (C, A) probabilities in CANDIDATES order, columns in ``model.actions`` order."""
    r = client.post("/v1/rank", json={"user_id": user_id, "candidates": CANDIDATES, "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_source"] == source and body["user_known"] is True
    by_id = {it["item_id"]: it["scores"] for it in body["items"]}
    return np.array([[by_id[c][a] for a in model.actions] for c in CANDIDATES], np.float32)


def test_online_user_sequence_has_event_times_aligned_with_items(layout):
    features = FeastOnlineFeatures(layout)
    for r in SEQUENCES:
        seq = features.user(r["user_id"]).sequence
        assert seq is not None and seq["item_ids"] == r["item_ids"], r["user_id"]
        if r["user_id"] in NO_ONLINE_TIMES:
            assert "ts" not in seq  # the row has no times: unknown, not zeros
        else:
            assert seq["ts"] == _unix_seconds(r["ts"]), r["user_id"]  # oldest first, one per item
    assert features.user(404).sequence is None


@pytest.mark.parametrize("mode", ["pinfm_early", "pinfm_late"])
def test_time_gap_ranker_serves_the_offline_scores(layout, mode):
    ranker = _tiny_ranker(mode, time_gaps=True)
    model = _serving_model(ranker, layout, f"gaps-{mode}")
    client = TestClient(create_app(layout, model_loader=lambda: model, warm_up_in_background=False))
    served = {u: _served_probs(client, model, u) for u in (1, 4, 5)}

    for user in (1, 4):  # online event_ts_s → time gaps, exactly as offline scoring of the snapshot's ts
        np.testing.assert_allclose(served[user], _offline_probs(ranker, layout, user), atol=2e-6, rtol=0)
    assert np.abs(served[1] - served[4]).max() > 1e-5  # same events, other gaps: other scores
    # no online times: scored without gaps, as offline scoring of the sequence without ts
    np.testing.assert_allclose(served[5], _offline_probs(ranker, layout, 5, with_ts=False), atol=2e-6, rtol=0)
    assert np.abs(served[5] - served[1]).max() > 1e-5


def test_ranker_without_time_gaps_ignores_event_times(layout):
    ranker = _tiny_ranker("pinfm_early", time_gaps=False)
    model = _serving_model(ranker, layout, "no-gaps")
    client = TestClient(create_app(layout, model_loader=lambda: model, warm_up_in_background=False))
    served = {u: _served_probs(client, model, u) for u in (1, 4, 5)}
    np.testing.assert_array_equal(served[1], served[4])
    np.testing.assert_array_equal(served[1], served[5])
    np.testing.assert_allclose(served[1], _offline_probs(ranker, layout, 1, with_ts=False), atol=2e-6, rtol=0)


def test_published_embeddings_use_the_same_time_gaps_as_the_service(layout):
    got: dict[int, dict] = {}
    for ids, sequences in iter_sequence_batches(layout, DS, batch_size=2):
        got.update(zip(ids, sequences, strict=True))
    assert {u: s["ts"] for u, s in got.items()} == {r["user_id"]: _unix_seconds(r["ts"]) for r in SEQUENCES}

    ranker = _tiny_ranker("pinfm_late", time_gaps=True)  # late fusion: the published vector is all of the user
    model = _serving_model(ranker, layout, "gaps-published")
    client = TestClient(create_app(layout, model_loader=lambda: model, warm_up_in_background=False))
    computed = {u: _served_probs(client, model, u) for u in (1, 4)}
    publish_user_embeddings(layout, model_loader=lambda: model)
    for user in (1, 4):
        precomputed = _served_probs(client, model, user, source="precomputed")
        np.testing.assert_allclose(precomputed, computed[user], atol=2e-6, rtol=0)


def test_store_set_up_before_event_times_still_serves(tmp_path, fresh_online_store):
    """Sources and registry from before ``event_ts_s``: materialize names the fix; ranking works without gaps."""
    from feast import FeatureView

    from features.config import day_window

    lay = Layout(tmp_path)
    seq_src = lay.feast / defs.USER_SEQUENCE_DIR / DS
    seq_src.mkdir(parents=True)
    old = pa.table(
        {
            "user_id": pa.array([1], pa.int64()),
            "item_ids": pa.array([USER_1["item_ids"]], pa.list_(pa.int64())),
            "actions": pa.array([USER_1["actions"]], pa.list_(pa.string())),
            "surfaces": pa.array([USER_1["surfaces"]], pa.list_(pa.string())),
            "n_events": pa.array([2], pa.int64()),
            "event_timestamp": pa.array([snapshot_timestamp(DS)], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(old, seq_src / "part-00000.parquet")
    register(lay)
    with pytest.raises(FeatureStoreError, match=rf"days \['{DS}'\] lack columns \['event_ts_s'\].*feast-export"):
        materialize(lay, end_ds=DS)

    # the registry as it was: user_sequence without event_ts_s, materialized by Feast itself
    old_view = FeatureView(
        name="user_sequence",
        entities=[defs.user],
        ttl=defs.SEQUENCE_TTL,
        schema=[f for f in defs.user_sequence.schema if f.name != defs.EVENT_TS_FIELD],
        source=defs.user_sequence_source,
        online=True,
    )
    fs = feature_store(lay)
    fs.apply([old_view])
    start, end = day_window(DS)
    fs.materialize(start_date=start, end_date=end, feature_views=["user_sequence"])

    features = FeastOnlineFeatures(lay)
    assert features.user(1).sequence == USER_1  # no "ts": unknown times
    model = _serving_model(_tiny_ranker("pinfm_early", time_gaps=True), lay, "gaps-old-store")
    client = TestClient(
        create_app(lay, model_loader=lambda: model, online_features=features, warm_up_in_background=False)
    )
    served = _served_probs(client, model, 1)
    assert served.shape == (len(CANDIDATES), len(model.actions)) and np.isfinite(served).all()


def test_the_service_reads_the_online_store_named(layout, online_store):
    """With Redis, what the tests above served came from the Redis database, not from a SQLite file."""
    online_db = layout.feast / "online.db"
    if online_store.kind == "sqlite":
        assert online_db.exists()
        return
    assert not online_db.exists()
    assert online_store.client().dbsize() >= len(SEQUENCES) + len(ITEMS)  # one hash per user and per item


def test_the_online_reader_returns_what_get_online_features_returns(layout):
    """The service reads the views through Feast's online store directly: the same rows as the SDK's read."""
    features = FeastOnlineFeatures(layout)
    fs = feature_store(layout)
    refs = ["user_sequence:item_ids", "user_sequence:actions", "user_sequence:surfaces", "user_sequence:event_ts_s"]
    for user_id in [r["user_id"] for r in SEQUENCES] + [999]:
        got = fs.get_online_features(features=refs, entity_rows=[{"user_id": user_id}]).to_dict()
        row = features.user(user_id)
        if got["item_ids"][0] is None:
            assert user_id == 999 and row.sequence is None
            continue
        assert row.sequence is not None
        assert row.sequence["item_ids"] == list(got["item_ids"][0])
        assert row.sequence["actions"] == list(got["actions"][0])
        assert row.sequence["surfaces"] == list(got["surfaces"][0])
        assert row.sequence.get("ts") == (None if got["event_ts_s"][0] is None else list(got["event_ts_s"][0]))
    ids = [i["item_id"] for i in ITEMS] + [77, 10]  # 77: no row; 10 twice
    got = fs.get_online_features(features=["item_features:content"], entity_rows=[{"item_id": i} for i in ids])
    expected = {i: list(c) for i, c in zip(ids, got.to_dict()["content"], strict=True) if c is not None}
    assert features.item_content(ids) == expected and 77 not in expected and len(expected) == len(ITEMS)


def test_item_content_is_served_from_memory_but_a_missing_item_is_read_again(layout, monkeypatch):
    features = FeastOnlineFeatures(layout)

    def f32(content: dict[int, list[float]]) -> dict[int, list[float]]:
        return {i: np.float32(c).tolist() for i, c in content.items()}

    assert features.item_content([10, 77]) == f32({10: _content(10)})
    reads: list[list[int]] = []
    reader = features._reader()
    real_read = reader.read

    def counting_read(view, join_key, ids, names):
        reads.append(list(ids))
        return real_read(view, join_key, ids, names)

    monkeypatch.setattr(reader, "read", counting_read)
    assert features.item_content([10, 11, 77]) == f32({10: _content(10), 11: _content(11)})
    assert reads == [[11, 77]]  # 10 came from memory; 77 (no content yet) is asked for again
    features.content_ttl_s = 0.0  # AFM_ITEM_CONTENT_TTL_S=0: every request reads the store
    features.item_content([10])
    assert reads[-1] == [10]
