"""Replay a day through the scoring service: its events into ``POST /v1/events`` in time order, its requests into ``POST /v1/rank`` at their times.

The day's raw events (every file of ``raw/events/ds=D``, the bad rows too) are sent in
(ts, event_id) order; each request of the day (``request_sequences/ds=D``: its user, surface
and time, the earliest impression) is sent when every event before its time has been sent
and none at or after it, with ``request_time`` set, so the service builds the sequence the
training example of that request holds: the snapshot of D-1 and D's explicit events before
the request. The candidates are the request's impressions (``ranking_examples/ds=D``), whose
labels give each action's AUC over the day's impressions.

``realtime=False`` sends no event: the service then serves the snapshot alone, as it did
before realtime events existed. Each replay starts from empty realtime rows for the day's
users, so run it against an evaluation data root, not a live service's store.

``afm events replay --ds D`` runs both and prints the AUC table (``--out`` writes it as JSON).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from features.config import Layout
from features.contract import EVENT_COLUMNS, LABEL_ACTIONS

log = logging.getLogger(__name__)

#: Events per POST /v1/events (about 200 bytes each: well inside the service's default body limit).
BATCH_SIZE = 100
_US = 1_000_000


class Client(Protocol):
    """What the replay posts through: ``httpx.Client(base_url=…)`` or ``fastapi.testclient.TestClient(app)``."""

    def post(self, url: str, *, json: Any) -> Any: ...


def rfc3339(ts_us: int) -> str:
    """Unix microseconds as an RFC 3339 UTC time with microseconds (``2026-01-04T10:00:00.123456Z``)."""
    when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(ts_us))
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_records(table: pa.Table, *, sort: bool = True) -> tuple[list[dict], np.ndarray]:
    """Events of a contract table as JSON objects (``ts`` RFC 3339, nulls left out), in (ts, event_id) order.

    Args:
        table: events with the contract's columns (others are left out).
        sort: order by (ts, event_id); False keeps the table's order.

    Returns:
        ``(events, ts_us)``: the objects and their times in unix microseconds (an event without a
        time sorts first, with ``ts_us`` = the smallest int64).
    """
    columns = [c for c in EVENT_COLUMNS if c in table.column_names]
    none = np.iinfo(np.int64).min
    if "ts" in table.column_names:
        ts = table.column("ts").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        ts_us = pc.fill_null(ts, none).to_numpy(zero_copy_only=False).astype(np.int64)
    else:  # every event is then rejected for its missing time
        ts_us = np.full(table.num_rows, none, np.int64)
    raw_ids = table.column("event_id").to_pylist() if "event_id" in table.column_names else [None] * table.num_rows
    ids = [str(x) if x is not None else "" for x in raw_ids]
    order = sorted(range(table.num_rows), key=lambda i: (ts_us[i], ids[i])) if sort else list(range(table.num_rows))
    rows = table.select(columns).to_pylist()
    events = []
    for i in order:
        row = {k: v for k, v in rows[i].items() if v is not None}
        if "ts" in row:
            row["ts"] = rfc3339(ts_us[i])
        events.append(row)
    return events, ts_us[order]


@dataclass
class DayLog:
    """One day to replay: its events in time order and its requests with their candidates and labels."""

    ds: str
    events: list[dict]
    ts_us: np.ndarray  # (E,) int64, ascending
    requests: pd.DataFrame  # request_id, user_id, surface, request_ts_us; in time order
    examples: pd.DataFrame  # request_id, item_id, label_<action> (ranking_examples/ds=D)
    candidates: dict[str, list[int]] = field(default_factory=dict)  # request_id → item ids

    @classmethod
    def read(cls, layout: Layout, ds: str) -> DayLog:
        """The raw events, request sequences and ranking examples of ``ds`` (the pipeline must have run the day)."""
        raw = Layout.partition(layout.raw_events, ds)
        if not raw.exists():
            raise FileNotFoundError(f"no raw events at {raw}")
        files = sorted(str(p) for p in raw.glob("*.parquet"))
        table = pads.dataset(files, format="parquet").to_table()
        events, ts_us = event_records(table)
        from training.data import read_partition

        reqs = read_partition(layout.request_sequences, ds, columns=["request_id", "user_id", "request_ts", "surface"])
        reqs = reqs.assign(
            request_ts_us=pd.to_datetime(reqs["request_ts"], utc=True).dt.as_unit("us").astype("int64"),
            request_id=reqs["request_id"].astype(str),
        )
        reqs = reqs.sort_values(["request_ts_us", "request_id"]).reset_index(drop=True)
        labels = [f"label_{a}" for a in LABEL_ACTIONS]
        ex = read_partition(layout.ranking_examples, ds, columns=["request_id", "item_id", *labels])
        ex = ex.assign(request_id=ex["request_id"].astype(str))
        candidates = {r: [int(i) for i in g] for r, g in ex.groupby("request_id", sort=False)["item_id"]}
        return cls(ds, events, ts_us, reqs.drop(columns=["request_ts"]), ex, candidates)


@dataclass
class ReplayResult:
    """Scores of every impression (``request_id``, ``item_id``, ``score_<action>``) and what the pushes returned."""

    scores: pd.DataFrame
    pushed: dict[str, int]
    seconds: float
    realtime_events: int  # summed over the requests: events of their sequences that came from realtime rows

    def auc(self, examples: pd.DataFrame) -> dict[str, float]:
        """Per-action AUC over the impressions of ``examples`` (every one must have been scored)."""
        from training.metrics import roc_auc

        merged = examples.merge(self.scores, on=["request_id", "item_id"], how="left", validate="one_to_one")
        out = {}
        for action in LABEL_ACTIONS:
            col = f"score_{action}"
            if col not in merged or merged[col].isna().any():
                raise ValueError(f"replay: {int(merged[col].isna().sum())} impressions have no {col}")
            out[action] = roc_auc(merged[f"label_{action}"].to_numpy(), merged[col].to_numpy())
        return out


def _ok(response: Any, what: str) -> dict:
    if response.status_code != 200:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json()


def replay(
    client: Client,
    day: DayLog,
    *,
    realtime: bool = True,
    batch_size: int = BATCH_SIZE,
    on_rank: Callable[[pd.Series, dict], None] | None = None,
) -> ReplayResult:
    """Send the day's events and requests in time order; see the module docstring.

    Args:
        client: posts to the service.
        day: the day to replay.
        realtime: send the events (False: requests only, served from the snapshot).
        batch_size: events per ``POST /v1/events``.
        on_rank: called with each request's row and the service's answer.

    Returns:
        The scores of every impression and the summed push counts.
    """
    started = time.perf_counter()
    pushed: dict[str, int] = {}
    sent = 0

    def push_until(t_us: int | None) -> None:
        nonlocal sent
        end = len(day.events) if t_us is None else int(np.searchsorted(day.ts_us, t_us, side="left"))
        while realtime and sent < end:
            batch = day.events[sent : min(end, sent + batch_size)]
            got = _ok(client.post("/v1/events", json={"events": batch}), "POST /v1/events")
            for key, value in got.items():
                if isinstance(value, int):
                    pushed[key] = pushed.get(key, 0) + value
            sent += len(batch)

    rows = []
    realtime_events = 0
    for _, req in day.requests.iterrows():
        push_until(int(req["request_ts_us"]))  # every event strictly before the request, none at or after it
        cands = day.candidates.get(req["request_id"])
        if not cands:
            continue
        body = {
            "user_id": int(req["user_id"]),
            "candidates": cands,
            "surface": req["surface"],
            "request_time": rfc3339(int(req["request_ts_us"])),
        }
        got = _ok(client.post("/v1/rank", json=body), f"POST /v1/rank for request {req['request_id']}")
        realtime_events += int(got.get("realtime_events", 0))
        if on_rank is not None:
            on_rank(req, got)
        for item in got["items"]:
            rows.append(
                {"request_id": req["request_id"], "item_id": int(item["item_id"])}
                | {f"score_{a}": float(p) for a, p in item["scores"].items()}
            )
    push_until(None)
    return ReplayResult(pd.DataFrame(rows), pushed, time.perf_counter() - started, realtime_events)


def clear_realtime(layout: Layout, user_ids: Sequence[int]) -> int:
    """Replace the users' realtime rows with empty ones (the start of a replay); returns the rows written."""
    from features.store import RealtimeSequence
    from serving.online_features import FeastOnlineFeatures

    features = FeastOnlineFeatures(layout)
    users = sorted({int(u) for u in user_ids})
    stored = features.realtime(users)
    now_us = int(time.time() * _US)
    rows = {u: RealtimeSequence(written_us=max(now_us, stored[u].written_us + 1 if u in stored else 0)) for u in users}
    return features.push_realtime(rows)


def replay_auc(layout: Layout, ds: str, *, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Replay ``ds`` in-process through the service of ``layout`` (CURRENT ranker, its Feast store) twice.

    First with the day's events (realtime), then without (snapshot only); the realtime rows of the
    day's users are emptied before each run.

    Returns:
        ``{ds, model_version, requests, impressions, events, pushed, runs: [{serving, auc_<action>, seconds,
        realtime_events}]}``.
    """
    from fastapi.testclient import TestClient

    from serving.app import create_app

    day = DayLog.read(layout, ds)
    app = create_app(layout, warm_up_in_background=False)
    model = app.state.afm.model
    if model is None:
        raise RuntimeError(f"the service has no model: {app.state.afm.load_error}")
    users = day.requests["user_id"].unique().tolist() + [
        e["user_id"] for e in day.events if isinstance(e.get("user_id"), int)
    ]
    runs, pushed = [], {}
    with TestClient(app) as client:
        for realtime in (True, False):
            clear_realtime(layout, users)
            result = replay(client, day, realtime=realtime, batch_size=batch_size)
            pushed = pushed or result.pushed
            auc = result.auc(day.examples)
            runs.append(
                {
                    "serving": "snapshot + realtime events" if realtime else "snapshot only",
                    **{f"auc_{a}": round(v, 4) for a, v in auc.items()},
                    "realtime_events": result.realtime_events,
                    "seconds": round(result.seconds, 1),
                }
            )
            log.info("replay ds=%s %s: %s", ds, runs[-1]["serving"], runs[-1])
    clear_realtime(layout, users)
    return {
        "ds": ds,
        "model_version": model.version,
        "requests": int(len(day.requests)),
        "impressions": int(len(day.examples)),
        "events": len(day.events),
        "pushed": pushed,
        "runs": runs,
    }
