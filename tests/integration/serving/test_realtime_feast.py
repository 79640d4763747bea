"""Realtime events through a real Feast store (the push source; online: SQLite, then Redis), the CLI and a real server.

No Spark: the snapshot is one offline source file written as ``afm features feast-export``
lays it out. The day-long replay against the training examples is test_realtime_parity.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from afm.cli import cli
from features.config import Layout
from features.contract import EVENT_SCHEMA
from features.feature_repo import definitions as defs
from features.store import FeatureStoreError, feature_store, materialize, register, snapshot_timestamp
from serving.online_features import FeastOnlineFeatures
from serving.routes.events import EventIngestor

DS = "2026-01-04"  # the snapshot's day; the events are of the next day
US = 1_000_000
DAY_END_US = int(dt.datetime(2026, 1, 5, tzinfo=dt.UTC).timestamp()) * US
SNAP = {
    "item_ids": [10, 11],
    "actions": ["click", "save"],
    "surfaces": ["home", "search"],
    "ts": [1767520800, 1767524400],
}


def event(event_id: str, seconds: float, user_id: int = 1, item_id: int = 20, action: str = "click") -> dict:
    when = dt.datetime(2026, 1, 5, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)
    return {"event_id": event_id, "user_id": user_id, "item_id": item_id, "action": action, "surface": "home",
            "ts": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}  # fmt: skip


@pytest.fixture
def layout(tmp_path, fresh_online_store) -> Layout:
    """User 1's snapshot of DS registered and materialized in the module's kind of online store."""
    lay = Layout(tmp_path)
    src = lay.feast / defs.USER_SEQUENCE_DIR / DS
    src.mkdir(parents=True)
    table = pa.table(
        {
            "user_id": pa.array([1], pa.int64()),
            "item_ids": pa.array([SNAP["item_ids"]], pa.list_(pa.int64())),
            "actions": pa.array([SNAP["actions"]], pa.list_(pa.string())),
            "surfaces": pa.array([SNAP["surfaces"]], pa.list_(pa.string())),
            defs.EVENT_TS_FIELD: pa.array([SNAP["ts"]], pa.list_(pa.int64())),
            "n_events": pa.array([2], pa.int64()),
            "event_timestamp": pa.array([snapshot_timestamp(DS)], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, src / "part-00000.parquet")
    register(lay)
    materialize(lay, end_ds=DS)
    return lay


def test_pushed_events_are_merged_after_the_snapshot_and_before_the_request(layout, fresh_online_store):
    features = FeastOnlineFeatures(layout)
    now_s = DAY_END_US // US + 86_400  # a clock that stands still: each write of a user must be stamped later
    ingest = EventIngestor(features, layout, clock=lambda: float(now_s))
    got = ingest.ingest([event("b", 60), event("a", 60, item_id=21), event("old", -60, item_id=99), event("c", 120)])
    assert (got["added"], got["users"], got["rejected"]) == (4, 1, 0)
    assert ingest.ingest([event("d", 180, item_id=22), event("a", 60)])["duplicates"] == 1  # a later write lands too
    row = features.realtime([1, 2])
    assert list(row) == [1] and row[1].event_ids == ("old", "a", "b", "c", "d") and row[1].written_us == now_s * US + 1

    user = features.user(1)  # "old" is before the snapshot's end: the snapshot's own
    assert user.sequence["item_ids"] == [10, 11, 21, 20, 20, 22] and user.realtime_events == 4
    assert user.sequence["ts"][2:] == [DAY_END_US // US + s for s in (60, 60, 120, 180)]
    at = features.user(1, before_us=DAY_END_US + 120 * US)  # strictly before: "c" (at 120 s) is not in it
    assert at.sequence["item_ids"] == [10, 11, 21, 20] and at.realtime_events == 2
    new_user = EventIngestor(features, layout).ingest([event("n1", 5, user_id=3)])
    assert new_user["users"] == 1 and features.user(3).sequence["item_ids"] == [20]  # no snapshot: events alone


def test_a_registry_from_before_the_realtime_view_serves_the_snapshot_and_refuses_events(tmp_path, fresh_online_store):
    lay = Layout(tmp_path)
    fs = feature_store(lay)
    fs.apply([o for o in defs.OBJECTS if o not in (defs.user_realtime_sequence, defs.user_realtime_push)])
    features = FeastOnlineFeatures(lay)
    assert features.user(1).sequence is None
    with pytest.raises(FeatureStoreError, match="afm features register"):
        EventIngestor(features, lay).ingest([event("e1", 1)])


@contextlib.contextmanager
def serving(layout: Layout) -> Iterator[str]:
    """``create_app`` over ``layout`` served by uvicorn on a free port, in a thread."""
    import uvicorn

    from serving.app import create_app

    class NoModel:  # ingestion needs no ranker
        def __call__(self):
            raise RuntimeError("no ranker in this test")

    app = create_app(layout, model_loader=NoModel(), warm_up_in_background=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _events_file(path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        for r in rows:
            r["ts"] = dt.datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")


@pytest.mark.parametrize("through", ["in-process", "url"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_afm_events_push(layout, tmp_path, through, suffix):
    path = tmp_path / f"today{suffix}"
    rows = [event("p1", 10, item_id=30), event("p2", 20, item_id=31), event("p3", 30, action="clik")]
    _events_file(path, [dict(r) for r in rows])
    args = ["events", "push", str(path), "--home", str(layout.root), "--batch-size", "2"]
    with contextlib.ExitStack() as stack:
        if through == "url":
            args += ["--url", stack.enter_context(serving(layout))]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output  # an event was rejected
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    text_line = suffix == ".jsonl"  # the line that is not JSON is sent as its text, rejected and kept too
    assert (summary["received"], summary["added"], summary["rejected"]) == (3 + text_line, 2, 1 + text_line)
    assert summary["rejections"][0] == {"index": 2, "event_id": "p3", "reasons": ["unknown_action"]}
    assert FeastOnlineFeatures(layout).user(1).sequence["item_ids"] == [10, 11, 30, 31]
    kept = [json.loads(x) for p in layout.quarantine_realtime.rglob("*.jsonl") for x in p.read_text().splitlines()]
    assert len(kept) == summary["rejected"]
