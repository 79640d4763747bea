"""Realtime events: the contract check of one event, the merge rules, the ingestion path and POST /v1/events.

The Feast round trip (SQLite and Redis) and the train/serve parity of a replayed day are in
tests/integration/serving/test_realtime_parity.py; here the online store is an in-memory double.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Sequence

import numpy as np
import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from features.store import RealtimeSequence
from serving.app import create_app
from serving.model import history_before_day
from serving.online_features import UserRow, merge_sequences
from serving.routes.events import FUTURE_SKEW_S, EventIngestor, parse_event, parse_time_us

US = 1_000_000
NOW_US = int(dt.datetime(2026, 1, 4, 12, tzinfo=dt.UTC).timestamp()) * US
DAY_START_US = int(dt.datetime(2026, 1, 4, tzinfo=dt.UTC).timestamp()) * US  # the end of the snapshot of 2026-01-03


def event(event_id: str, user_id: int = 7, item_id: int = 10, action: str = "click", ts: str = "2026-01-04T10:00:00Z"):
    return {"event_id": event_id, "user_id": user_id, "item_id": item_id, "action": action, "surface": "home", "ts": ts}


# ------------------------------------------------------------------ one event
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-04T10:00:00Z", dt.datetime(2026, 1, 4, 10, tzinfo=dt.UTC)),
        ("2026-01-04T10:00:00.123456Z", dt.datetime(2026, 1, 4, 10, 0, 0, 123456, tzinfo=dt.UTC)),
        ("2026-01-04T10:00:00.1234569z", dt.datetime(2026, 1, 4, 10, 0, 0, 123456, tzinfo=dt.UTC)),  # cut, not rounded
        ("2026-01-04t11:30:00+01:30", dt.datetime(2026, 1, 4, 10, tzinfo=dt.UTC)),
        ("2026-01-04T08:00:00-02:00", dt.datetime(2026, 1, 4, 10, tzinfo=dt.UTC)),
    ],
)
def test_rfc3339_times_are_read_to_the_microsecond(text, expected):
    assert parse_time_us(text) == (expected - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@pytest.mark.parametrize(
    "text",
    ["2026-01-04", "2026-01-04T10:00:00", "2026-02-30T10:00:00Z", "2026-01-04T24:00:00Z", "2026-01-04T23:59:60Z",
     "2026-01-04 10:00:00Z", "1767520800", 1767520800, None, "2026-01-04T10:00:00+24:00", "x" * 100],
)  # fmt: skip
def test_anything_else_is_not_a_time(text):
    assert parse_time_us(text) is None


def test_a_valid_event_is_read():
    ev, reasons = parse_event({**event("e1"), "request_id": "r1", "dwell_ms": 300}, NOW_US)
    assert reasons == [] and ev is not None
    assert (ev.event_id, ev.user_id, ev.item_id, ev.action, ev.surface) == ("e1", 7, 10, "click", "home")
    assert ev.ts_us == DAY_START_US + 10 * 3600 * US and (ev.request_id, ev.dwell_ms) == ("r1", 300)


@pytest.mark.parametrize(
    ("change", "reasons"),
    [
        ({"event_id": None}, ["null_event_id"]),
        ({"event_id": ""}, ["null_event_id"]),
        ({"user_id": 0}, ["user_id_out_of_domain"]),
        ({"item_id": -3}, ["item_id_out_of_domain"]),
        ({"item_id": 2**63}, ["item_id_out_of_domain"]),
        ({"action": "clik"}, ["unknown_action"]),
        ({"surface": "sidebar"}, ["unknown_surface"]),
        ({"ts": None}, ["null_ts"]),
        ({"ts": "2026-01-04"}, ["bad_ts"]),
        ({"ts": "2026-01-04T12:06:00Z"}, ["ts_in_future"]),
        ({"user_id": "7"}, ["wrong_type_user_id"]),
        ({"item_id": 10.0}, ["wrong_type_item_id"]),
        ({"user_id": True}, ["wrong_type_user_id"]),
        ({"action": 3}, ["wrong_type_action"]),
        ({"dwell_ms": "long"}, ["wrong_type_dwell_ms"]),
        ({"color": "red"}, ["unexpected_field"]),
        (
            {"action": "clik", "surface": None, "user_id": 0},
            ["null_surface", "unknown_action", "user_id_out_of_domain"],
        ),
    ],
)
def test_an_invalid_event_gets_every_reason(change, reasons):
    ev, got = parse_event({**event("e1"), **change}, NOW_US)
    assert ev is None and got == reasons


def test_a_little_clock_skew_is_allowed_and_non_objects_are_refused():
    ahead = dt.datetime(2026, 1, 4, 12, tzinfo=dt.UTC) + dt.timedelta(seconds=FUTURE_SKEW_S)
    assert parse_event(event("e1", ts=ahead.strftime("%Y-%m-%dT%H:%M:%SZ")), NOW_US)[1] == []
    for raw in (5, "text", ["e1"], None):
        assert parse_event(raw, NOW_US) == (None, ["not_an_object"])


# ------------------------------------------------------------------ the merge
def row(*events: tuple[int, str, int, str], written_us: int = 1) -> RealtimeSequence:
    """A realtime row from ``(ts_us, event_id, item_id, action)``."""
    return RealtimeSequence.of([(t, e, i, a, "home") for t, e, i, a in events], written_us)


SNAPSHOT = {"item_ids": [1, 2], "actions": ["click", "save"], "surfaces": ["home", "search"], "ts": [100, 200]}


def test_the_sequence_is_the_snapshot_then_the_realtime_events_after_it_and_before_the_request():
    rt = row(
        (DAY_START_US - 5, "old", 9, "click"),  # the snapshot's own (before its end): left out
        (DAY_START_US + 3 * US, "b", 4, "save"),
        (DAY_START_US + 3 * US, "a", 3, "click"),  # same time: ordered by event id
        (DAY_START_US + 9 * US, "late", 5, "hide"),
    )
    seq, n = merge_sequences(SNAPSHOT, DAY_START_US, rt, before_us=DAY_START_US + 9 * US)
    assert seq == {
        "item_ids": [1, 2, 3, 4],
        "actions": ["click", "save", "click", "save"],
        "surfaces": ["home", "search", "home", "home"],
        "ts": [100, 200, DAY_START_US // US + 3, DAY_START_US // US + 3],
    }
    assert n == 2
    everything, n_all = merge_sequences(SNAPSHOT, DAY_START_US, rt)  # no request time: every stored event
    assert everything["item_ids"] == [1, 2, 3, 4, 5] and n_all == 3


def test_the_merge_dedupes_by_event_id_and_keeps_the_newest_max_len():
    rt = row(
        *[(DAY_START_US + k * US, f"e{k:02d}", 100 + k, "click") for k in range(6)], (DAY_START_US, "e00", 100, "click")
    )
    seq, n = merge_sequences(SNAPSHOT, DAY_START_US, rt, max_len=4)
    assert seq["item_ids"] == [102, 103, 104, 105] and n == 4
    seq, n = merge_sequences(SNAPSHOT, DAY_START_US, rt, max_len=8)
    assert seq["item_ids"] == [1, 2, 100, 101, 102, 103, 104, 105] and n == 6


def test_a_user_without_a_snapshot_or_without_events():
    rt = row((DAY_START_US + US, "a", 3, "click"))
    assert merge_sequences(None, None, rt)[0] == {
        "item_ids": [3], "actions": ["click"], "surfaces": ["home"], "ts": [DAY_START_US // US + 1]
    }  # fmt: skip
    assert merge_sequences(None, None, None) == (None, 0)
    assert merge_sequences(None, None, rt, before_us=DAY_START_US) == (None, 0)  # nothing before the request
    assert merge_sequences(SNAPSHOT, DAY_START_US, None) == (SNAPSHOT, 0)
    no_times = {k: v for k, v in SNAPSHOT.items() if k != "ts"}  # a snapshot without times: no times at all
    assert merge_sequences(no_times, DAY_START_US, rt)[0] == {
        "item_ids": [1, 2, 3], "actions": ["click", "save", "click"], "surfaces": ["home", "search", "home"]
    }  # fmt: skip


def test_a_request_older_than_the_snapshot_sees_only_its_earlier_events():
    seq, _ = merge_sequences(SNAPSHOT, DAY_START_US, None, before_us=150 * US)
    assert seq["item_ids"] == [1] and seq["ts"] == [100]


def test_a_realtime_row_merges_new_events_once_in_order():
    old = row((5, "b", 2, "click"), (9, "c", 3, "save"))
    new = [(7, "a", 1, "hide", "home"), (5, "b", 99, "click", "home"), (7, "a", 1, "hide", "home")]
    merged, dups = old.merged(new, max_len=10)
    assert merged.event_ids == ("b", "a", "c") and merged.item_ids == (2, 1, 3) and dups == ["b", "a"]
    assert merged.written_us == old.written_us
    assert old.merged(new, max_len=2)[0].event_ids == ("a", "c")


# ------------------------------------------------------------------ ingestion
class MemoryRealtime:
    """OnlineFeatures with realtime rows in memory; ``user`` merges like FeastOnlineFeatures.user."""

    def __init__(self, snapshots: dict[int, dict] | None = None, embeddings: dict[int, list[float]] | None = None):
        self.snapshots = snapshots or {}
        self.embeddings = embeddings or {}
        self.rows: dict[int, RealtimeSequence] = {}
        self.pushes: list[dict[int, RealtimeSequence]] = []
        self.fail = False
        self.user_calls: list[tuple[int, int | None]] = []

    def status(self) -> str:
        return "ok"

    def user(self, user_id: int, before_us: int | None = None) -> UserRow:
        self.user_calls.append((user_id, before_us))
        seq, n = merge_sequences(self.snapshots.get(user_id), DAY_START_US, self.rows.get(user_id), before_us)
        emb = self.embeddings.get(user_id)
        return UserRow(sequence=seq, embedding=emb, model_version="r1" if emb else None, realtime_events=n)

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        return {}

    def realtime(self, user_ids: Sequence[int]) -> dict[int, RealtimeSequence]:
        if self.fail:
            raise ConnectionError("online store is down")
        return {u: self.rows[u] for u in user_ids if u in self.rows}

    def push_realtime(self, rows: dict[int, RealtimeSequence]) -> int:
        if self.fail:
            raise ConnectionError("online store is down")
        for u, r in rows.items():
            assert r.written_us > self.rows.get(u, RealtimeSequence()).written_us  # every write is stamped later
        self.rows.update(rows)
        self.pushes.append(dict(rows))
        return len(rows)


def _quarantined(layout: Layout) -> list[dict]:
    return [json.loads(line) for p in sorted(layout.quarantine_realtime.rglob("*.jsonl")) for line in p.open()]


def test_valid_explicit_events_join_their_users_rows_and_invalid_ones_are_quarantined(tmp_path):
    layout, store = Layout(tmp_path), MemoryRealtime()
    ingest = EventIngestor(store, layout, clock=lambda: NOW_US / US)
    batch = [
        event("e2", ts="2026-01-04T10:00:02Z"),
        event("e1", ts="2026-01-04T10:00:01Z", item_id=11),
        event("e3", user_id=8, action="save"),
        {**event("imp"), "action": "impression", "request_id": "r1"},
        event("bad", action="clik"),
        7,
    ]
    got = ingest.ingest(batch)
    assert {k: got[k] for k in ("received", "accepted", "added", "duplicates", "impressions", "rejected", "users")} == {
        "received": 6, "accepted": 4, "added": 3, "duplicates": 0, "impressions": 1, "rejected": 2, "users": 2
    }  # fmt: skip
    assert got["rejections"] == [
        {"index": 4, "event_id": "bad", "reasons": ["unknown_action"]},
        {"index": 5, "event_id": None, "reasons": ["not_an_object"]},
    ]
    assert got["quarantine"] == "quarantine/realtime/ds=2026-01-04/" + ingest.quarantine.file_name
    assert store.rows[7].event_ids == ("e1", "e2") and store.rows[7].item_ids == (11, 10)
    assert store.rows[8].actions == ("save",) and store.rows[7].written_us == NOW_US
    kept = _quarantined(layout)
    assert [(q["index"], q["reasons"], q["event"]) for q in kept] == [
        (4, ["unknown_action"], batch[4]),
        (5, ["not_an_object"], 7),
    ]
    assert kept[0]["received_at"] == "2026-01-04T12:00:00Z"

    again = ingest.ingest(batch[:3])  # a retried batch: nothing is added twice, no row is written
    assert (again["accepted"], again["added"], again["duplicates"], again["users"]) == (3, 0, 3, 0)
    assert len(store.pushes) == 1
    assert ingest.metrics.events.labels("accepted")._value.get() == 4
    assert ingest.metrics.events.labels("duplicate")._value.get() == 3
    assert ingest.metrics.rejected.labels("unknown_action")._value.get() == 1


def test_a_user_row_keeps_its_newest_events_and_each_write_is_stamped_later(tmp_path):
    store = MemoryRealtime()
    ingest = EventIngestor(store, Layout(tmp_path), clock=lambda: NOW_US / US, max_len=3)
    for k in range(5):
        ingest.ingest([event(f"e{k}", ts=f"2026-01-04T10:00:0{k}Z", item_id=100 + k)])
    assert store.rows[7].item_ids == (102, 103, 104)
    assert [p[7].written_us for p in store.pushes] == [NOW_US + k for k in range(5)]  # the clock stood still


def test_a_failed_store_quarantines_and_counts_nothing_so_the_batch_can_be_sent_again(tmp_path):
    layout, store = Layout(tmp_path), MemoryRealtime()
    store.fail = True
    ingest = EventIngestor(store, layout, clock=lambda: NOW_US / US)
    with pytest.raises(ConnectionError):
        ingest.ingest([event("e1"), event("bad", action="clik")])
    assert _quarantined(layout) == [] and ingest.metrics.events.labels("rejected")._value.get() == 0


def test_concurrent_batches_of_one_user_lose_no_event(tmp_path):
    store = MemoryRealtime()
    real_realtime = store.realtime

    def slow_read(user_ids):  # widen the read-modify-write window
        rows = real_realtime(user_ids)
        threading.Event().wait(0.002)
        return rows

    store.realtime = slow_read
    ingest = EventIngestor(store, Layout(tmp_path), clock=lambda: NOW_US / US)
    threads = [
        threading.Thread(target=ingest.ingest, args=([event(f"t{t}-{k}", ts=f"2026-01-04T10:{t:02d}:{k:02d}Z") for k in range(3)],))
        for t in range(8)
    ]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store.rows[7]) == 24


# ------------------------------------------------------------------ the routes
class TimedModel:
    """A ranker double that records the sequence and request time it was given; click = 1 / (1 + len(sequence))."""

    version = "r1"
    actions = ("click", "save", "hide")
    embedding_dim = 2

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.embedded: list[dict] = []

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray:
        self.embedded += sequences
        return np.array([[len(s["item_ids"]), 0.0] for s in sequences], np.float32)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None, request_ts=None) -> np.ndarray:
        self.calls.append({"sequence": sequence, "request_ts": request_ts, "embedding": list(user_embedding)})
        click = np.full(len(candidates), 1.0 / (1 + len(sequence["item_ids"])), np.float32)
        return np.stack([click, click, click], axis=1)


@pytest.fixture
def service(tmp_path):
    model = TimedModel()
    store = MemoryRealtime(snapshots={7: dict(SNAPSHOT)}, embeddings={7: [9.0, 9.0]})
    app = create_app(Layout(tmp_path), model_loader=lambda: model, online_features=store, warm_up_in_background=False)
    return TestClient(app), model, store, Layout(tmp_path)


def test_post_events_then_rank_at_a_time_sees_the_events_before_it(service):
    client, model, store, layout = service
    r = client.post("/v1/events", json={"events": [event("e1", ts="2026-01-04T10:00:00Z", item_id=3),
                                                   event("e2", ts="2026-01-04T11:00:00Z", item_id=4),
                                                   event("e3", action="clik")]})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["added"], body["rejected"], body["users"]) == (2, 2, 1, 1)
    assert body["rejections"] == [{"index": 2, "event_id": "e3", "reasons": ["unknown_action"]}]
    assert len(_quarantined(layout)) == 1

    r = client.post("/v1/rank", json={"user_id": 7, "candidates": [5, 6], "surface": "home",
                                      "request_time": "2026-01-04T10:30:00.000001Z"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["realtime_events"] == 1 and r.json()["embedding_source"] == "precomputed"
    call = model.calls[-1]
    assert call["sequence"]["item_ids"] == [1, 2, 3]
    assert call["request_ts"] == int(dt.datetime(2026, 1, 4, 10, 30, tzinfo=dt.UTC).timestamp())
    assert store.user_calls[-1] == (7, DAY_START_US + int(10.5 * 3600 * US) + 1)

    r = client.post("/v1/rank", json={"user_id": 7, "candidates": [5], "surface": "home"})  # now: every event
    assert r.json()["realtime_events"] == 2 and model.calls[-1]["sequence"]["item_ids"] == [1, 2, 3, 4]
    assert model.calls[-1]["request_ts"] is None and store.user_calls[-1] == (7, None)


def test_the_user_embedding_covers_the_history_before_the_requests_day(service):
    client, model, store, _ = service
    client.post("/v1/events", json={"events": [event("e1"), event("e2", user_id=9)]})
    r = client.post("/v1/rank", json={"user_id": 7, "candidates": [5], "surface": "home"})
    assert r.json()["embedding_source"] == "precomputed" and r.json()["realtime_events"] == 1  # published: kept
    assert model.calls[-1]["embedding"] == [9.0, 9.0] and len(model.calls[-1]["sequence"]["item_ids"]) == 3
    store.snapshots[9] = dict(SNAPSHOT)  # no published embedding: computed from the events before the day
    r = client.post("/v1/rank", json={"user_id": 9, "candidates": [5], "surface": "home",
                                      "request_time": "2026-01-04T11:00:00Z"})  # fmt: skip
    assert r.json()["embedding_source"] == "computed" and r.json()["realtime_events"] == 1
    assert model.embedded[-1]["item_ids"] == [1, 2] and model.calls[-1]["embedding"] == [2.0, 0.0]
    assert model.calls[-1]["sequence"]["item_ids"] == [1, 2, 10]


def test_history_before_day():
    seq = {"item_ids": [1, 2, 3], "actions": ["click"] * 3, "surfaces": ["home"] * 3, "ts": [100, 86_399, 86_400]}
    assert history_before_day(seq, 86_400 + 5)["item_ids"] == [1, 2]
    assert history_before_day(seq, 86_399)["ts"] == []  # the request's day is day 0: nothing before it
    no_times = {k: v for k, v in seq.items() if k != "ts"}
    assert history_before_day(no_times, 10**9) == no_times


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "events"),
        ({"events": []}, "1 to 1000 events"),
        ({"events": [{}] * 1001}, "1 to 1000 events"),
        ({"events": {"event_id": "e"}}, "events"),
        ({"events": [event("e")], "more": 1}, "more"),
    ],
)
def test_a_malformed_batch_is_422(service, body, needle):
    client, _, store, _ = service
    r = client.post("/v1/events", json=body)
    assert r.status_code == 422 and needle in r.json()["error"], r.text
    assert store.pushes == []


@pytest.mark.parametrize("when", ["2026-01-04", "2026-01-04T10:00:00", 1767520800, "soon"])
def test_a_bad_request_time_is_422(service, when):
    client, model, _, _ = service
    scored = len(model.calls)  # the warm-up's pass
    r = client.post("/v1/rank", json={"user_id": 7, "candidates": [5], "surface": "home", "request_time": when})
    assert r.status_code == 422 and "request_time" in r.json()["error"], r.text
    assert len(model.calls) == scored


def test_a_store_that_fails_or_takes_no_events_is_503(service, tmp_path, fakes):
    client, _, store, layout = service
    store.fail = True
    r = client.post("/v1/events", json={"events": [event("e1"), event("e2", action="clik")]})
    assert r.status_code == 503 and "send them again" in r.json()["error"]
    assert _quarantined(layout) == []
    plain = create_app(
        Layout(tmp_path / "plain"), model_loader=fakes.TinyModel, online_features=fakes.MemoryFeatures(),
        warm_up_in_background=False,
    )  # fmt: skip
    r = TestClient(plain).post("/v1/events", json={"events": [event("e1")]})
    assert r.status_code == 503 and "no realtime events" in r.json()["error"]


def test_metrics_count_events_by_outcome_and_reason(service):
    client, _, _, _ = service
    client.post("/v1/events", json={"events": [event("e1"), event("e1"), {**event("e2"), "surface": "sidebar"}]})
    text = client.get("/metrics").text
    assert 'afm_events_total{outcome="accepted"} 1.0' in text
    assert 'afm_events_total{outcome="duplicate"} 1.0' in text
    assert 'afm_events_total{outcome="rejected"} 1.0' in text
    assert 'afm_events_rejected_total{reason="unknown_surface"} 1.0' in text


def test_a_realtime_row_keeps_the_training_cap():
    from features.feature_repo.definitions import REALTIME_MAX_LEN
    from features.tables import MAX_SEQ_LEN

    assert EventIngestor(MemoryRealtime(), Layout(".")).max_len == REALTIME_MAX_LEN == MAX_SEQ_LEN
