"""Three planted days through run_day: sequences (incremental == full), examples (point in time), corpus, rerun.

World (MAX_LEN=5, SEG=3):
- D1: user 1 clicks items 1-4; user 2 saves item 7; request r0 (user 1) and r9 (user 3); one bad row.
- D2: request r1 of user 1 at T=12:00 (items 100, 101, 102, 100 again); user 1 acts at 08:00 (203),
  T-1µs (200), exactly T (201), T+1µs (202), and on the shown items after T (labels); request r2 of
  user 2 (item 300, clicked); request r3 of user 4 (no history); an impression without request_id.
- D3: user 1 shares/downloads 500, 501 and clicks 510/511 at the same ts (event_id breaks the tie),
  then request r4 at 20:00; user 3's first explicit event.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.examples import point_in_time_violations
from features.pipeline import run_day
from features.sequences import (
    SequenceError,
    build_user_sequences,
    full_recompute_user_sequences,
    previous_snapshot,
)
from features.tables import (
    PRETRAIN_CORPUS_SCHEMA,
    RANKING_EXAMPLES_SCHEMA,
    REQUEST_SEQUENCES_SCHEMA,
    USER_SEQUENCES_SCHEMA,
)

pytestmark = pytest.mark.spark

D1, D2, D3 = "2026-01-05", "2026-01-06", "2026-01-07"
MAX_LEN, SEG = 5, 3
TABLES = ("valid_events", "quarantine_events", "user_sequences", "ranking_examples", "request_sequences")
TABLES += ("pretrain_corpus",)


def _plant(layout: Layout, raw) -> None:
    at, ev = raw.at, raw.event
    d1 = [
        *[ev(f"d1-{i}", 1, i, "click", at(D1, 10, i)) for i in range(1, 5)],
        ev("d1-7", 2, 7, "save", at(D1, 11), surface="search"),
        ev("d1-r0", 1, 50, "impression", at(D1, 9), request_id="r0"),
        ev("d1-r9", 3, 8, "impression", at(D1, 12), request_id="r9"),
        ev("d1-bad", 2, 9, "teleport", at(D1, 13)),
    ]
    t = (D2, 12)
    d2 = [
        ev("d2-i100", 1, 100, "impression", at(*t), request_id="r1"),
        ev("d2-i101", 1, 101, "impression", at(*t, 0, 1), request_id="r1"),
        ev("d2-i102", 1, 102, "impression", at(*t, 0, 2), request_id="r1"),
        ev("d2-i100b", 1, 100, "impression", at(*t, 0, 3), request_id="r1"),
        ev("d2-203", 1, 203, "click", at(D2, 8)),
        ev("d2-200", 1, 200, "click", at(D2, 11, 59, 59, 999_999)),  # T - 1µs: in r1's sequence
        ev("d2-201", 1, 201, "click", at(*t)),  # exactly T: not in r1's sequence
        ev("d2-202", 1, 202, "click", at(*t, 0, 0, 1)),  # T + 1µs: not in r1's sequence
        ev("d2-c100", 1, 100, "click", at(*t, 0, 5), request_id="r1"),
        ev("d2-s101", 1, 101, "save", at(*t, 0, 10), request_id="r1"),
        ev("d2-h102", 1, 102, "hide", at(*t, 0, 20), request_id="r1"),
        ev("d2-i300", 2, 300, "impression", at(D2, 15), surface="related", request_id="r2"),
        ev("d2-c300", 2, 300, "click", at(D2, 15, 1), surface="related", request_id="r2"),
        ev("d2-i400", 4, 400, "impression", at(D2, 16), request_id="r3"),
        ev("d2-i301", 2, 301, "impression", at(D2, 17)),
    ]
    d3 = [
        ev("d3-500", 1, 500, "share", at(D3, 9)),
        ev("d3-501", 1, 501, "download", at(D3, 9, 1)),
        ev("d3-b", 1, 511, "click", at(D3, 10)),
        ev("d3-a", 1, 510, "click", at(D3, 10)),
        ev("d3-8", 3, 8, "click", at(D3, 10)),
        ev("d3-i600", 1, 600, "impression", at(D3, 20), request_id="r4"),
        ev("d3-late", 1, 601, "click", at(D3, 21)),
    ]
    for ds, rows in ((D1, d1), (D2, d2), (D3, d3)):
        raw.write_raw(layout, ds, rows)


class _NoStore:
    """Hide features.store (another component) so run_day takes its skip path."""

    def __enter__(self):
        self.saved = sys.modules.get("features.store")
        sys.modules["features.store"] = None  # import raises ImportError
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            sys.modules["features.store"] = self.saved
        else:
            sys.modules.pop("features.store", None)


def _snapshot(layout: Layout, ds: str) -> dict[str, pd.DataFrame]:
    out = {}
    for name in TABLES:
        path = Layout.partition(getattr(layout, name), ds)
        out[name] = pd.read_parquet(path)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, spark, raw):
    layout = Layout(tmp_path_factory.mktemp("world"))
    _plant(layout, raw)
    results = {}
    with _NoStore():
        for ds in (D1, D2, D3):
            results[ds] = run_day(layout, ds, max_len=MAX_LEN, segment_len=SEG)
    return layout, results


def _utc(value) -> pd.Timestamp:
    """pandas gives list elements as naive UTC datetime64: make them aware to compare with scalar columns."""
    ts = pd.Timestamp(value)
    return ts if ts.tzinfo is not None else ts.tz_localize("UTC")


def _rows(layout: Layout, table: str, ds: str, key: str) -> dict:
    df = pd.read_parquet(Layout.partition(getattr(layout, table), ds))
    return {row[key]: row for row in df.to_dict("records")}


def test_run_day_steps_and_reports(world):
    layout, results = world
    for ds in (D1, D2, D3):
        res = results[ds]
        assert set(res) == {"gate", "sequences", "examples", "corpus", "feast", "data_docs"}
        assert res["feast"].startswith("skipped")
        assert Path(res["data_docs"]).is_file()
        for step in ("gate", "sequences", "examples", "corpus"):
            report = json.loads((Layout.partition(layout.reports, ds) / f"{step}.json").read_text())
            assert report["status"] == "ok"
            assert all(report["gx"].values()) or step == "gate"
    gate1 = results[D1]["gate"]
    assert gate1["rows_in"] == 8 and gate1["rows_valid"] == 7 and gate1["by_reason"] == {"unknown_action": 1}


def test_user_sequences_incremental_snapshots(world):
    layout, results = world
    s1 = _rows(layout, "user_sequences", D1, "user_id")
    assert list(s1[1]["item_ids"]) == [1, 2, 3, 4] and s1[1]["n_events"] == 4
    assert list(s1[2]["item_ids"]) == [7] and list(s1[2]["surfaces"]) == ["search"]
    assert set(s1) == {1, 2}  # impressions only (user 3) make no sequence
    s2 = _rows(layout, "user_sequences", D2, "user_id")
    assert list(s2[1]["item_ids"]) == [201, 202, 100, 101, 102] and s2[1]["n_events"] == 11
    assert list(s2[1]["actions"]) == ["click", "click", "click", "save", "hide"]
    assert list(s2[2]["item_ids"]) == [7, 300] and s2[2]["n_events"] == 2
    assert 4 not in s2
    s3 = _rows(layout, "user_sequences", D3, "user_id")
    # D3 adds 500, 501, 510 (d3-a), 511 (d3-b), 601: last five of 16 events
    assert list(s3[1]["item_ids"]) == [500, 501, 510, 511, 601] and s3[1]["n_events"] == 16
    assert s3[1]["last_ts"] == pd.Timestamp(f"{D3} 21:00", tz="UTC")
    assert list(s3[3]["item_ids"]) == [8] and list(s3[2]["item_ids"]) == [7, 300]
    assert results[D3]["sequences"]["users_capped"] == 1


@pytest.mark.parametrize("ds", [D2, D3])
def test_incremental_equals_full_recompute(world, spark, ds, tmp_path):
    layout, _ = world
    inc = pd.read_parquet(Layout.partition(layout.user_sequences, ds)).sort_values("user_id").reset_index(drop=True)
    # written and read back the same way as the incremental snapshot, so types compare like for like
    full_recompute_user_sequences(spark, layout, ds, MAX_LEN).write.parquet(str(tmp_path / "full"))
    full = pd.read_parquet(tmp_path / "full").sort_values("user_id").reset_index(drop=True)
    assert len(inc) == len(full) > 0
    for col in ("user_id", "last_ts", "n_events"):
        assert list(inc[col]) == list(full[col]), col
    for col in ("item_ids", "actions", "surfaces", "ts"):
        assert [list(x) for x in inc[col]] == [list(x) for x in full[col]], col
    assert (inc["n_events"] > inc["item_ids"].map(len)).any()  # the cap was hit


def test_from_scratch_rebuild_writes_the_same_snapshot(world, spark):
    layout, _ = world
    before = pd.read_parquet(Layout.partition(layout.user_sequences, D3))
    res = build_user_sequences(spark, layout, D3, MAX_LEN, from_scratch=True)
    assert res["mode"] == "full" and res["gx"] == {"user_sequences": True}
    pd.testing.assert_frame_equal(before, pd.read_parquet(Layout.partition(layout.user_sequences, D3)))


def test_missing_previous_snapshot_is_refused(world, spark):
    layout, _ = world
    with pytest.raises(SequenceError, match="snapshot of ds=2026-01-08 is missing.*build ds=2026-01-08 first"):
        previous_snapshot(spark, layout, "2026-01-09")


def test_request_sequences_are_point_in_time(world):
    layout, _ = world
    r2 = _rows(layout, "request_sequences", D2, "request_id")
    assert set(r2) == {"r1", "r2", "r3"}
    r1 = r2["r1"]
    assert r1["request_ts"] == pd.Timestamp(f"{D2} 12:00", tz="UTC") and r1["user_id"] == 1
    # D1 snapshot [1,2,3,4] + D2 events before T: 203 (08:00), 200 (T-1µs); never 201 (T) or 202 (T+1µs)
    assert list(r1["item_ids"]) == [2, 3, 4, 203, 200]
    assert list(r2["r2"]["item_ids"]) == [7] and r2["r2"]["surface"] == "related"
    assert list(r2["r3"]["item_ids"]) == []
    r3 = _rows(layout, "request_sequences", D3, "request_id")
    assert list(r3["r4"]["item_ids"]) == [102, 500, 501, 510, 511]  # not 601 (after the request)
    r1d = _rows(layout, "request_sequences", D1, "request_id")
    assert list(r1d["r0"]["item_ids"]) == [] and list(r1d["r9"]["item_ids"]) == []


@pytest.mark.parametrize("ds", [D1, D2, D3])
def test_no_sequence_event_at_or_after_its_impression(world, ds):
    layout, _ = world
    ex = pd.read_parquet(Layout.partition(layout.ranking_examples, ds))
    seq = pd.read_parquet(Layout.partition(layout.request_sequences, ds))
    joined = ex.merge(seq, on="request_id", suffixes=("", "_seq"))
    assert len(joined) == len(ex) > 0
    for _, row in joined.iterrows():
        seq_ts = [_utc(t) for t in row["ts"]]
        assert all(t < row["impression_ts"] for t in seq_ts), (row["request_id"], row["item_id"])
        assert all(t < row["request_ts"] for t in seq_ts)
        assert row["request_ts"] <= row["impression_ts"]


def test_point_in_time_check_catches_leaks(spark, raw):
    import datetime as dt

    t = raw.at(D2, 12)
    rows = [("ok", t, [t - dt.timedelta(microseconds=1)]), ("at", t, [t]), ("after", t, [t + dt.timedelta(seconds=1)])]
    df = spark.createDataFrame(rows, "request_id string, request_ts timestamp, ts array<timestamp>")
    assert point_in_time_violations(df) == 2


def test_ranking_examples_labels(world):
    layout, results = world
    ex = pd.read_parquet(Layout.partition(layout.ranking_examples, D2))
    got = {(r.request_id, r.item_id): (r.label_click, r.label_save, r.label_hide) for r in ex.itertuples(index=False)}
    assert got == {
        ("r1", 100): (1, 0, 0),
        ("r1", 101): (0, 1, 0),
        ("r1", 102): (0, 0, 1),
        ("r2", 300): (1, 0, 0),
        ("r3", 400): (0, 0, 0),
    }
    first = ex[(ex.request_id == "r1") & (ex.item_id == 100)].iloc[0]
    assert first["impression_ts"] == pd.Timestamp(f"{D2} 12:00", tz="UTC")  # the earliest of the two impressions
    assert str(ex["label_click"].dtype) == "int32"
    res = results[D2]["examples"]
    assert res["examples"] == 5 and res["requests"] == 3 and res["impressions_without_request"] == 1
    assert res["positives"] == {"click": 2, "save": 1, "hide": 1}


def test_pretrain_corpus_segments(world):
    layout, results = world
    c3 = pd.read_parquet(Layout.partition(layout.pretrain_corpus, D3))
    segs = {(r.user_id, r.segment): list(r.item_ids) for r in c3.itertuples(index=False)}
    assert segs == {(1, 0): [500, 501], (1, 1): [510, 511, 601], (2, 0): [7, 300]}  # user 3 (1 event) skipped
    assert results[D3]["corpus"]["users_skipped"] == 1
    c1 = pd.read_parquet(Layout.partition(layout.pretrain_corpus, D1))
    # user 1 has 4 events: the single oldest one is dropped, the newest three form segment 0
    assert [(r.user_id, r.segment, list(r.item_ids)) for r in c1.itertuples(index=False)] == [(1, 0, [2, 3, 4])]


@pytest.mark.parametrize(
    ("table", "schema"),
    [
        ("user_sequences", USER_SEQUENCES_SCHEMA),
        ("request_sequences", REQUEST_SEQUENCES_SCHEMA),
        ("ranking_examples", RANKING_EXAMPLES_SCHEMA),
        ("pretrain_corpus", PRETRAIN_CORPUS_SCHEMA),
    ],
)
def test_outputs_follow_table_schemas(world, table, schema):
    layout, _ = world
    files = list(Layout.partition(getattr(layout, table), D2).glob("*.parquet"))
    assert len(files) == 1
    got = pq.read_schema(files[0])
    assert got.names == schema.names
    assert [f.type for f in got] == [f.type for f in schema]


def test_rerun_gives_identical_outputs(world):
    layout, _ = world
    before = _snapshot(layout, D3)
    with _NoStore():
        again = run_day(layout, D3, max_len=MAX_LEN, segment_len=SEG)
    after = _snapshot(layout, D3)
    for name in TABLES:
        pd.testing.assert_frame_equal(before[name], after[name], check_exact=True, obj=name)
        assert len(list(Layout.partition(getattr(layout, name), D3).glob("*.parquet"))) == 1
    assert again["sequences"]["users"] == 3
