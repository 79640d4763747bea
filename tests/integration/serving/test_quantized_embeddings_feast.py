"""Quantized user embeddings through a real Feast store (parquet offline; online: SQLite, then Redis).

A ranker exported with ``afm model export --quantize`` publishes its user embeddings per-row
int8 (or int4) in ``user_embedding:embedding_q``; the service decodes them and uses them under
the same version guard as float ones. Float and quantized versions share the offline source;
a registry from before the field keeps serving float rows and refuses quantized ones by name.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from features.config import Layout
from features.feature_repo import definitions as defs
from features.store import (
    QUANTIZED_EMBEDDING_FIELD,
    FeatureStoreError,
    decode_user_embedding,
    encode_user_embeddings,
    feature_store,
    materialize,
    register,
    snapshot_timestamp,
    write_user_embeddings,
)
from features.tables import USER_SEQUENCES_SCHEMA
from serving.app import create_app
from serving.embeddings import publish_user_embeddings
from serving.model import load_ranker
from serving.online_features import FeastOnlineFeatures
from training.jobs.export import export_quantized
from training.jobs.registry import save_artifact
from training.model.backbone import PinFMConfig
from training.model.ranker import NewItemConfig, Ranker, RankerConfig

DS = "2026-01-05"
T = dt.datetime(2026, 1, 5, 8, tzinfo=dt.UTC)
USERS = {
    1: {"item_ids": [10, 11, 12], "actions": ["click", "save", "click"], "surfaces": ["home", "search", "home"]},
    2: {"item_ids": [12], "actions": ["hide"], "surfaces": ["related"]},
    3: {"item_ids": [13, 10, 11, 14], "actions": ["click"] * 4, "surfaces": ["home"] * 4},
}
CANDIDATES = [10, 11, 12, 13, 14, 15]


def _snapshot(lay: Layout) -> None:
    """The day's user_sequences snapshot (what publish-embeddings reads) and its Feast source."""
    rows = [
        {"user_id": u, **s, "ts": [T + dt.timedelta(seconds=i) for i in range(len(s["item_ids"]))]}
        for u, s in USERS.items()
    ]
    rows = [{**r, "last_ts": r["ts"][-1], "n_events": len(r["item_ids"])} for r in rows]
    snap = pa.Table.from_pylist(rows, schema=USER_SEQUENCES_SCHEMA)
    part = lay.partition(lay.user_sequences, DS)
    part.mkdir(parents=True)
    pq.write_table(snap, part / "part-00000.parquet")
    src = lay.feast / defs.USER_SEQUENCE_DIR / DS
    src.mkdir(parents=True)
    event_ts = [[int(t.timestamp()) for t in r["ts"]] for r in rows]
    table = (
        snap.select(["user_id", "item_ids", "actions", "surfaces", "n_events"])
        .append_column(defs.EVENT_TS_FIELD, pa.array(event_ts, pa.list_(pa.int64())))
        .append_column("event_timestamp", pa.array([snapshot_timestamp(DS)] * len(rows), pa.timestamp("us", tz="UTC")))
    )
    pq.write_table(table, src / "part-00000.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory, online_store) -> tuple[Layout, str]:
    """A layout with a snapshot, Feast registered and materialized, and a float tiny ranker in the registry."""
    lay = Layout(tmp_path_factory.mktemp(f"afm_quantized_{online_store.kind}"))
    _snapshot(lay)
    register(lay)
    materialize(lay, end_ds=DS)
    torch.manual_seed(0)
    cfg = RankerConfig(backbone=PinFMConfig.preset("tiny"), new_items=NewItemConfig.off())
    ranker = Ranker(cfg)
    with torch.no_grad():
        for tab in ranker.backbone.items.tables:
            tab.weight.mul_(10)  # away from the init scale: quantization has work to do
    version = save_artifact(lay, "ranker", ranker.state_dict(), {"ranker": cfg.to_dict()}, {}, {})
    return lay, version


def _online(lay: Layout, users: list[int]) -> dict:
    return (
        feature_store(lay)
        .get_online_features(
            features=[
                "user_embedding:embedding",
                f"user_embedding:{QUANTIZED_EMBEDDING_FIELD}",
                "user_embedding:model_version",
            ],
            entity_rows=[{"user_id": u} for u in users],
        )
        .to_dict()
    )


def test_the_codec_is_the_model_librarys_quantizer() -> None:
    from training.model.quantize import dequantize_rows, quantize_rows

    assert QUANTIZED_EMBEDDING_FIELD == defs.QUANTIZED_EMBEDDING_FIELD
    w = np.random.default_rng(0).normal(size=(50, 33)).astype(np.float32)
    for bits in (8, 4):
        payloads = encode_user_embeddings(w, bits)
        assert {len(p) for p in payloads} == {3 + (4 + 33 if bits == 8 else 8 + 17)}
        decoded = np.stack([decode_user_embedding(p) for p in payloads])
        np.testing.assert_array_equal(decoded, dequantize_rows(quantize_rows(torch.from_numpy(w), bits)).numpy())
    with pytest.raises(FeatureStoreError, match="needs 40"):
        decode_user_embedding(encode_user_embeddings(w[:1], 8)[0][:-1] + b"")
    with pytest.raises(FeatureStoreError, match="has 5 bits"):
        decode_user_embedding(bytes([5, 1, 0]) + b"\0" * 5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_models_embeddings_round_trip_and_serve_under_the_version_guard(
    world: tuple[Layout, str], fmt: str
) -> None:
    lay, source = world
    out = export_quantized(lay, source, quantize="int8", user_embeddings=fmt, evaluate_day=False)
    model = load_ranker(lay, out["version"])
    summary = publish_user_embeddings(lay, model_loader=lambda: model)
    assert summary["embedding_format"] == fmt and summary["n_users"] == len(USERS)
    got = _online(lay, [1, 2, 3])
    assert got["embedding"] == [None, None, None]  # the float field is empty for quantized rows
    assert got["model_version"] == [model.version] * 3
    d = model.embedding_dim
    assert {len(p) for p in got[QUANTIZED_EMBEDDING_FIELD]} == {3 + (4 + d if fmt == "int8" else 8 + d // 2)}
    # what the service reads: the decoded embedding, within half a quantization step of the model's floats
    features = FeastOnlineFeatures(lay)
    for u in (1, 2, 3):
        row = features.user(u)
        assert row.model_version == model.version and row.sequence is not None
        want = model.user_embeddings([row.sequence])[0]  # the float embedding of the snapshot's sequence
        step = (np.abs(want).max() / 127) if fmt == "int8" else (want.max() - want.min()) / 15
        err = np.abs(np.asarray(row.embedding) - want).max()
        assert 0 < err <= step / 2 * (1 + 1e-5) + 1e-6, (u, err, step)
    client = TestClient(
        create_app(lay, model_loader=lambda: model, online_features=features, warm_up_in_background=False)
    )
    r = client.post("/v1/rank", json={"user_id": 1, "candidates": CANDIDATES, "surface": "home"})
    assert r.status_code == 200, r.text
    assert r.json()["embedding_source"] == "precomputed" and r.json()["model_version"] == model.version
    stored = np.asarray(features.user(1).embedding, np.float32)
    by_id = {it["item_id"]: it["scores"]["click"] for it in r.json()["items"]}
    expect = model.score(stored, CANDIDATES, "home", sequence=features.user(1).sequence)[:, 0]
    np.testing.assert_allclose([by_id[c] for c in CANDIDATES], expect, atol=1e-6)
    # the float source is not the version these embeddings were computed by: the guard recomputes
    fp32 = load_ranker(lay, source)
    client = TestClient(
        create_app(lay, model_loader=lambda: fp32, online_features=features, warm_up_in_background=False)
    )
    r = client.post("/v1/rank", json={"user_id": 1, "candidates": CANDIDATES, "surface": "home"})
    assert r.status_code == 200 and r.json()["embedding_source"] == "computed"


def test_float_and_quantized_versions_share_the_source_and_the_newest_wins(
    world: tuple[Layout, str], online_store
) -> None:
    lay, source = world
    fp32 = load_ranker(lay, source)
    assert publish_user_embeddings(lay, model_loader=lambda: fp32)["embedding_format"] == "fp32"
    row = FeastOnlineFeatures(lay).user(2)
    assert row.model_version == source
    assert (
        np.abs(np.asarray(row.embedding) - fp32.user_embeddings([{**USERS[2], "ts": [int(T.timestamp())]}])[0]).max()
        < 1e-6
    )
    got = _online(lay, [2])
    assert got[QUANTIZED_EMBEDDING_FIELD] == [None]
    fp32_bytes = _online_value_bytes(lay, online_store.kind)
    out = export_quantized(lay, source, quantize="int4", user_embeddings="int8", evaluate_day=False)
    q = load_ranker(lay, out["version"])
    publish_user_embeddings(lay, model_loader=lambda: q)  # published later: this version's rows win
    row = FeastOnlineFeatures(lay).user(2)
    assert row.model_version == q.version and len(row.embedding) == q.embedding_dim
    versions = sorted(p.name for p in (lay.feast / defs.USER_EMBEDDING_DIR).iterdir())
    assert source in versions and q.version in versions
    for name in versions:  # every file has both fields, null where unused
        schema = pq.read_schema(next((lay.feast / defs.USER_EMBEDDING_DIR / name).glob("*.parquet")))
        assert {"embedding", QUANTIZED_EMBEDDING_FIELD} <= set(schema.names)
    if online_store.kind == "sqlite":  # the store's own bytes per user: the int8 value against the float list
        q_bytes = _online_value_bytes(lay, "sqlite")
        assert q_bytes["embedding_q"] < fp32_bytes["embedding"] / 3


def _online_value_bytes(lay: Layout, kind: str) -> dict[str, float]:
    """SQLite only: the mean stored bytes of each user_embedding feature value (non-empty values)."""
    if kind != "sqlite":
        return {}
    with sqlite3.connect(lay.feast / "online.db") as con:
        rows = con.execute(
            "SELECT feature_name, AVG(LENGTH(value)) FROM activityfm_user_embedding WHERE LENGTH(value) > 2 "
            "GROUP BY feature_name"
        ).fetchall()
    return {name: float(n) for name, n in rows}


def test_a_registry_from_before_the_field_serves_float_rows_and_refuses_quantized_ones(
    tmp_path, fresh_online_store
) -> None:
    from feast import FeatureView

    lay = Layout(tmp_path)
    _snapshot(lay)
    register(lay)
    old_view = FeatureView(
        name="user_embedding",
        entities=[defs.user],
        ttl=defs.EMBEDDING_TTL,
        schema=[f for f in defs.user_embedding.schema if f.name != defs.QUANTIZED_EMBEDDING_FIELD],
        source=defs.user_embedding_source,
        online=True,
    )
    fs = feature_store(lay)
    fs.apply([old_view])
    assert defs.QUANTIZED_EMBEDDING_FIELD not in {f.name for f in fs.get_feature_view("user_embedding").features}
    import pandas as pd

    frame = pd.DataFrame(
        {"user_id": [1], "embedding": [[0.5, -1.0, 0.25]], "model_version": ["v1"], "event_timestamp": [T]}
    )
    with pytest.raises(FeatureStoreError, match=r"no user_embedding:embedding_q field .*run `afm features register`"):
        write_user_embeddings(lay, frame, bits=8)
    write_user_embeddings(lay, frame)  # float rows as before
    row = FeastOnlineFeatures(lay).user(1)
    assert row.embedding == pytest.approx([0.5, -1.0, 0.25]) and row.model_version == "v1"
    assert FeastOnlineFeatures(lay).user(99).embedding is None
    # register again (the new definitions): quantized rows are accepted and read back
    register(lay)
    write_user_embeddings(lay, frame.assign(model_version="v2", event_timestamp=[T + dt.timedelta(hours=1)]), bits=8)
    row = FeastOnlineFeatures(lay).user(1)
    assert row.model_version == "v2" and np.abs(np.asarray(row.embedding) - [0.5, -1.0, 0.25]).max() <= 1 / 254 + 1e-7


def test_an_old_float_file_without_the_field_and_a_quantized_one_materialize_together(
    tmp_path, fresh_online_store
) -> None:
    """A source folder written before ``embedding_q`` (no such column) next to a quantized version's."""
    lay = Layout(tmp_path)
    _snapshot(lay)
    register(lay)
    old = lay.feast / defs.USER_EMBEDDING_DIR / "v-old"
    old.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2], pa.int64()),
                "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32())),
                "model_version": pa.array(["v-old"] * 2),
                "event_timestamp": pa.array([T, T], pa.timestamp("us", tz="UTC")),
            }
        ),
        old / "part-0.parquet",
    )
    import pandas as pd

    later = T + dt.timedelta(hours=1)
    frame = pd.DataFrame(
        {"user_id": [2], "embedding": [[0.5, -0.5]], "model_version": ["v-new"], "event_timestamp": [later]}
    )
    write_user_embeddings(lay, frame, bits=4)
    materialize(lay, end_ds=DS)  # everything up to the day's end: both folders
    upgraded = pq.read_table(old)  # the old folder got the column (null), its rows as they were
    assert upgraded.column(QUANTIZED_EMBEDDING_FIELD).null_count == 2
    assert upgraded.column("embedding").to_pylist() == [[1.0, 2.0], [3.0, 4.0]]
    features = FeastOnlineFeatures(lay)
    assert features.user(1).model_version == "v-old" and features.user(1).embedding == pytest.approx([1.0, 2.0])
    assert features.user(2).model_version == "v-new"
    np.testing.assert_allclose(features.user(2).embedding, [0.5, -0.5], atol=1 / 15 / 2 + 1e-6)
