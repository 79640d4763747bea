"""Feast round trip: Spark writes a snapshot → export → register → materialize → online/offline reads."""

from __future__ import annotations

import datetime as dt
import os
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import ITEM_SCHEMA
from features.store import (
    FeatureStoreError,
    export_feast_sources,
    feature_store,
    historical_features,
    materialize,
    register,
    write_user_embeddings,
)
from features.tables import USER_SEQUENCES_SCHEMA

pytestmark = pytest.mark.spark

UTC = dt.UTC
DS1, DS2 = "2026-01-05", "2026-01-06"


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("test_feast_store")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    yield session
    session.stop()


def _ts(day: str, hour: int) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def _seconds(times: list[dt.datetime]) -> list[int]:
    return [int(t.timestamp()) for t in times]


def _sequences(day: str) -> list[dict]:
    """Users 1 and 2 on DS1; on DS2 user 1 has one more event and user 3 appears."""
    rows = [
        {
            "user_id": 1,
            "item_ids": [10, 11],
            "actions": ["click", "save"],
            "surfaces": ["home", "search"],
            "ts": [_ts(DS1, 8), _ts(DS1, 9)],
            "last_ts": _ts(DS1, 9),
            "n_events": 2,
        },
        {
            "user_id": 2,
            "item_ids": [12],
            "actions": ["hide"],
            "surfaces": ["related"],
            "ts": [_ts(DS1, 10)],
            "last_ts": _ts(DS1, 10),
            "n_events": 1,
        },
    ]
    if day == DS2:
        rows[0] = {
            **rows[0],
            "item_ids": [10, 11, 13],
            "actions": ["click", "save", "share"],
            "surfaces": ["home", "search", "home"],
            "ts": [*rows[0]["ts"], _ts(DS2, 7) + dt.timedelta(microseconds=250_000)],
            "last_ts": _ts(DS2, 7) + dt.timedelta(microseconds=250_000),
            "n_events": 3,
        }
        rows.append(
            {
                "user_id": 3,
                "item_ids": [],
                "actions": [],
                "surfaces": [],
                "ts": [],
                "last_ts": _ts(DS2, 1),
                "n_events": 0,
            }
        )
    return rows


SPARK_SEQUENCE_DDL = (
    "user_id bigint, item_ids array<bigint>, actions array<string>, surfaces array<string>, "
    "ts array<timestamp>, last_ts timestamp, n_events bigint"
)


def _write_sequences(spark, layout: Layout, day: str) -> None:
    # Spark writes the partition as the sequences job does (a directory of part files).
    rows = _sequences(day)
    assert set(rows[0]) == set(USER_SEQUENCES_SCHEMA.names)
    df = spark.createDataFrame(rows, schema=SPARK_SEQUENCE_DDL).select(*USER_SEQUENCES_SCHEMA.names)
    df.repartition(2).write.mode("overwrite").parquet(str(layout.partition(layout.user_sequences, day)))


ITEMS = [
    {"item_id": 10, "created_at": _ts("2025-12-01", 0), "category": "a", "content": [0.5, -1.25, 2.0]},
    {"item_id": 11, "created_at": _ts("2025-12-02", 0), "category": "b", "content": [1.0, 0.0, 0.25]},
    {"item_id": 12, "created_at": _ts(DS1, 3), "category": None, "content": [0.0, 0.0, 0.0]},
    # created after DS1: must not be online when materializing up to DS1
    {"item_id": 13, "created_at": _ts(DS2, 5), "category": "c", "content": [3.0, 2.0, 1.0]},
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory, spark, online_store) -> Layout:
    lay = Layout(tmp_path_factory.mktemp("afm"))
    lay.items.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ITEMS, schema=ITEM_SCHEMA), lay.items / "items.parquet")
    for day in (DS1, DS2):
        _write_sequences(spark, lay, day)
    return lay


def _online_users(layout: Layout, user_ids: list[int]) -> dict:
    fs = feature_store(layout)
    return fs.get_online_features(
        features=[
            "user_sequence:item_ids",
            "user_sequence:actions",
            "user_sequence:surfaces",
            "user_sequence:event_ts_s",
            "user_sequence:n_events",
        ],
        entity_rows=[{"user_id": u} for u in user_ids],
    ).to_dict()


def test_export_before_inputs_names_the_missing_partition(tmp_path, spark):
    with pytest.raises(FeatureStoreError, match="no user_sequences snapshot for ds=2026-01-05"):
        export_feast_sources(spark, Layout(tmp_path), DS1)


def test_materialize_before_register_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureStoreError, match="afm features register"):
        materialize(Layout(tmp_path), end_ds=DS1)


def test_round_trip_spark_to_online_and_point_in_time(spark, layout):
    summary = register(layout)
    assert summary["feature_views"] == ["item_features", "user_embedding", "user_realtime_sequence", "user_sequence"]
    assert summary["entities"] == ["item", "user"]
    assert register(layout) == summary  # idempotent

    out1 = export_feast_sources(spark, layout, DS1)
    assert out1["user_sequence_rows"] == 2 and out1["item_rows"] == 4
    out2 = export_feast_sources(spark, layout, DS2)
    assert out2["user_sequence_rows"] == 3
    assert export_feast_sources(spark, layout, DS2) == out2  # rerun replaces, does not append
    day_files = list((layout.feast / "sources" / "user_sequence" / DS2).glob("*.parquet"))
    assert len(day_files) >= 1

    # ---- online, as of the end of DS1
    m1 = materialize(layout, end_ds=DS1)
    assert m1["views"]["user_sequence"]["rows"] == 2
    assert m1["views"]["item_features"]["rows"] == 3  # item 13 is created on DS2
    got = _online_users(layout, [1, 2, 3])
    assert got["user_id"] == [1, 2, 3]
    assert got["item_ids"] == [[10, 11], [12], None]
    assert got["actions"] == [["click", "save"], ["hide"], None]
    assert got["surfaces"] == [["home", "search"], ["related"], None]
    # per-event unix seconds, oldest first, aligned with item_ids
    assert got["event_ts_s"] == [_seconds([_ts(DS1, 8), _ts(DS1, 9)]), _seconds([_ts(DS1, 10)]), None]
    assert got["n_events"] == [2, 1, None]

    items = (
        feature_store(layout)
        .get_online_features(
            features=["item_features:category", "item_features:content", "item_features:created_at_s"],
            entity_rows=[{"item_id": i} for i in (10, 12, 13)],
        )
        .to_dict()
    )
    assert items["category"] == ["a", None, None]
    assert items["content"][0] == pytest.approx([0.5, -1.25, 2.0])
    assert items["content"][2] is None
    assert items["created_at_s"][0] == int(_ts("2025-12-01", 0).timestamp())

    # ---- online, as of the end of DS2: exactly what Spark wrote for DS2
    m2 = materialize(layout, end_ds=DS2)
    assert m2["views"]["user_sequence"]["rows"] == 3
    got = _online_users(layout, [1, 2, 3])
    want = {r["user_id"]: r for r in _sequences(DS2)}
    for i, user in enumerate(got["user_id"]):
        for col in ("item_ids", "actions", "surfaces", "n_events"):
            assert got[col][i] == want[user][col], (user, col)
        assert got["event_ts_s"][i] == _seconds(want[user]["ts"]), user  # sub-second parts truncated
        assert len(got["event_ts_s"][i]) == len(got["item_ids"][i])

    # ---- offline point-in-time: the snapshot valid at each entity timestamp
    entity_df = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "event_timestamp": pd.to_datetime(
                ["2026-01-05T12:00:00Z", "2026-01-06T12:00:00Z", "2026-01-07T12:00:00Z"], utc=True
            ),
        }
    )
    hist = historical_features(
        layout, entity_df, ["user_sequence:item_ids", "user_sequence:event_ts_s", "user_sequence:n_events"]
    )
    assert list(hist["event_timestamp"]) == list(entity_df["event_timestamp"])  # one row per input, in order
    # mid-DS1: DS1's snapshot is stamped at the END of DS1, so nothing yet (no leakage)
    assert pd.isna(hist.loc[0, "n_events"])
    assert list(hist.loc[1, "item_ids"]) == [10, 11] and hist.loc[1, "n_events"] == 2
    assert list(hist.loc[2, "item_ids"]) == [10, 11, 13] and hist.loc[2, "n_events"] == 3
    assert list(hist.loc[2, "event_ts_s"]) == _seconds(_sequences(DS2)[0]["ts"])


def test_user_embeddings_round_trip_and_newest_version_wins(spark, layout):
    register(layout)
    t0 = dt.datetime(2026, 1, 7, 1, tzinfo=UTC)
    df_a = pd.DataFrame(
        {
            "user_id": [1, 2],
            "embedding": [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]],
            "model_version": ["v1", "v1"],
            "event_timestamp": [t0, t0],
        }
    )
    write_user_embeddings(layout, df_a)
    df_b = pd.DataFrame(
        {
            "user_id": [1],
            "embedding": [[9.0, 8.0, 7.0]],
            "model_version": ["v2"],
            "event_timestamp": [t0 + dt.timedelta(hours=1)],
        }
    )
    write_user_embeddings(layout, df_b)
    got = (
        feature_store(layout)
        .get_online_features(
            features=["user_embedding:embedding", "user_embedding:model_version"],
            entity_rows=[{"user_id": 1}, {"user_id": 2}, {"user_id": 99}],
        )
        .to_dict()
    )
    assert got["model_version"] == ["v2", "v1", None]
    assert got["embedding"][0] == pytest.approx([9.0, 8.0, 7.0])
    assert got["embedding"][1] == pytest.approx([1.0, 2.0, 3.0])
    assert got["embedding"][2] is None

    with pytest.raises(FeatureStoreError, match="different embedding lengths"):
        write_user_embeddings(layout, df_a.assign(embedding=[[0.1], [1.0, 2.0]]))
    with pytest.raises(FeatureStoreError, match="missing columns"):
        write_user_embeddings(layout, df_a.drop(columns=["model_version"]))


def test_the_rows_live_in_the_online_store_named(layout, online_store) -> None:
    """After the round trips: with Redis, the online rows are in the Redis server, not in a SQLite file."""
    online_db = [f for f in layout.feast.rglob("*.db") if f.name == "online.db"]
    if online_store.kind == "sqlite":
        assert online_db
        return
    assert online_store.client().dbsize() >= 3  # users and items written by materialize
    assert not online_db
