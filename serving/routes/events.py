"""``POST /v1/events``: today's events, validated against the event contract, into the realtime sequences.

A batch of events (the contract's fields, ``ts`` as an RFC 3339 time with an offset) is
checked event by event. A valid explicit event (any action but ``impression``) joins its
user's realtime row in the Feast online store (``user_realtime_sequence``, through the push
source ``user_realtime_push``): the row's events plus the new ones, one per event id,
ordered by (time, event id), the newest ``REALTIME_MAX_LEN``. A valid impression is
accepted and counted; the sequences hold explicit actions only, as in training. At ranking
time the service merges the row with the daily snapshot (``serving.online_features``).

An invalid event is never dropped silently: the answer names its index and reasons, the
counter ``afm_events_rejected_total{reason}`` counts it, and it is appended, as received and
with its reasons, to ``$AFM_HOME/quarantine/realtime/ds=<day received>/`` (JSON lines).
Reasons are the daily gate's where they apply (``null_<column>``, ``user_id_out_of_domain``,
``item_id_out_of_domain``, ``unknown_action``, ``unknown_surface``), plus ``not_an_object``,
``unexpected_field``, ``wrong_type_<column>``, ``bad_ts`` (not an RFC 3339 time with an
offset) and ``ts_in_future`` (more than ``FUTURE_SKEW_S`` ahead of the service's clock).

An event id already in the user's row (a retried batch) is accepted as a ``duplicate`` and
not added again, so a batch can be sent again after an error. Writes of one user are
serialized in the process (a read-modify-write of the row under a per-user lock); the push
happens before the quarantine write, so a batch that failed (503) is retried whole.

:class:`EventIngestor` is the whole path; ``afm events push`` runs the same class in-process
when it is not given a service URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from features.config import Layout
from features.contract import EVENT_COLUMNS, IMPRESSION, validate_event_record
from features.store import RealtimeSequence
from features.tables import MAX_SEQ_LEN
from serving.online_features import RealtimeStore
from serving.schemas import PREVIEW_CHARS, clip, describe, error_response, error_responses, preview
from serving.state import ServiceMetrics, ServiceState

log = logging.getLogger(__name__)

#: Events one ``POST /v1/events`` may carry (the body limit may refuse a large batch first: 413).
MAX_EVENTS = 1000
#: How far ahead of the service's clock an event's time may be (client clocks drift).
FUTURE_SKEW_S = 300
_US = 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: RFC 3339 date-time with an offset; fractions beyond microseconds are cut.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_INT_COLUMNS = ("user_id", "item_id", "dwell_ms")
_STR_COLUMNS = ("event_id", "action", "surface", "request_id")


def parse_time_us(text: object) -> int | None:
    """Unix microseconds of an RFC 3339 date-time with an offset (``2026-01-04T10:00:00.5Z``); None when it is not one."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m.group(7) or "0")[:6].ljust(6, "0"))
    try:
        offset = dt.timedelta(0)
        if m.group(9):
            offset = dt.timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
            if offset >= dt.timedelta(days=1):
                return None
            offset = offset if m.group(9) == "+" else -offset
        when = dt.datetime(year, month, day, hour, minute, second, micros, tzinfo=dt.timezone(offset))
    except ValueError:  # day 31 of a 30-day month, hour 24, a leap second …
        return None
    return (when - _EPOCH) // dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Event:
    """A valid event, its time in unix microseconds."""

    event_id: str
    user_id: int
    item_id: int
    action: str
    surface: str
    ts_us: int
    request_id: str | None = None
    dwell_ms: int | None = None

    def token(self) -> tuple[int, str, int, str, str]:
        """``(ts_us, event_id, item_id, action, surface)``: an event of a realtime row."""
        return (self.ts_us, self.event_id, self.item_id, self.action, self.surface)


def parse_event(raw: object, now_us: int) -> tuple[Event | None, list[str]]:
    """Check one received event against the event contract.

    Args:
        raw: the event as received (a JSON object: ``event_id``, ``user_id``, ``item_id``,
            ``action``, ``surface``, ``ts`` as RFC 3339 with an offset, optional ``request_id``
            and ``dwell_ms``).
        now_us: the service's clock (unix microseconds): ``ts`` may be at most ``FUTURE_SKEW_S`` ahead.

    Returns:
        ``(event, [])`` for a valid event, ``(None, reasons)`` otherwise.
    """
    if not isinstance(raw, dict):
        return None, ["not_an_object"]
    reasons: list[str] = []
    if any(key not in EVENT_COLUMNS for key in raw):
        reasons.append("unexpected_field")
    record: dict[str, Any] = {}
    for col in EVENT_COLUMNS:
        value = raw.get(col)
        if value is None:
            record[col] = None
        elif col in _INT_COLUMNS and (not isinstance(value, int) or isinstance(value, bool)):
            reasons.append(f"wrong_type_{col}")
        elif col in _STR_COLUMNS and not isinstance(value, str):
            reasons.append(f"wrong_type_{col}")
        elif col == "event_id" and not value:
            reasons.append("null_event_id")
        elif col == "ts":
            ts_us = parse_time_us(value)
            if ts_us is None:
                reasons.append("bad_ts")
            elif ts_us > now_us + FUTURE_SKEW_S * _US:
                reasons.append("ts_in_future")
            record[col] = ts_us
        else:
            record[col] = value
    # wrongly typed columns are left out of the record: the contract would call them null
    checked = [r for r in validate_event_record(record) if not _about_a_reported_column(r, reasons)]
    reasons = sorted(set(reasons + checked))
    if reasons:
        return None, reasons
    return (
        Event(
            event_id=record["event_id"],
            user_id=record["user_id"],
            item_id=record["item_id"],
            action=record["action"],
            surface=record["surface"],
            ts_us=record["ts"],
            request_id=record["request_id"],
            dwell_ms=record["dwell_ms"],
        ),
        [],
    )


def _about_a_reported_column(reason: str, reported: list[str]) -> bool:
    """Whether ``reason`` (``null_<col>`` from the contract) is about a column already refused for its type or time."""
    if not reason.startswith("null_"):
        return False
    col = reason.removeprefix("null_")
    return f"wrong_type_{col}" in reported or (col == "ts" and ("bad_ts" in reported or "ts_in_future" in reported))


# ------------------------------------------------------------------------ pieces
class UserLocks:
    """Per-user locks for read-modify-write of realtime rows, as a fixed set of stripes (bounded memory)."""

    def __init__(self, stripes: int = 1024) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    @contextlib.contextmanager
    def hold(self, user_ids: Iterable[int]) -> Iterator[None]:
        """Hold the locks of ``user_ids`` (taken in one global order, so two batches never deadlock)."""
        stripes = sorted({int(u) % len(self._locks) for u in user_ids})
        taken: list[threading.Lock] = []
        try:
            for s in stripes:
                self._locks[s].acquire()
                taken.append(self._locks[s])
            yield
        finally:
            for lock in reversed(taken):
                lock.release()


class Quarantine:
    """Appends rejected events (as received, with their reasons) to ``layout.quarantine_realtime/ds=D/<host>-<pid>.jsonl``."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
        self.file_name = f"events-{host}-{os.getpid()}.jsonl"

    def path(self, now_us: int) -> Path:
        day = (_EPOCH + dt.timedelta(microseconds=now_us)).date().isoformat()
        return Layout.partition(self.layout.quarantine_realtime, day) / self.file_name

    def write(self, rejected: Sequence[tuple[int, object, list[str]]], now_us: int) -> Path:
        """Append one JSON line per ``(index, event as received, reasons)``; returns the file."""
        path = self.path(now_us)
        received_at = (_EPOCH + dt.timedelta(microseconds=now_us)).isoformat().replace("+00:00", "Z")
        lines = "".join(
            json.dumps({"received_at": received_at, "index": i, "reasons": reasons, "event": raw}, default=str) + "\n"
            for i, raw, reasons in rejected
        )
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        return path


class EventMetrics:
    """``afm_events_total{outcome}`` (accepted, duplicate, rejected) and ``afm_events_rejected_total{reason}``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.events = Counter(
            "afm_events", "Events received by POST /v1/events, by outcome", ["outcome"], registry=registry
        )
        self.rejected = Counter(
            "afm_events_rejected", "Events rejected by POST /v1/events, by reason", ["reason"], registry=registry
        )


class EventIngestor:
    """Validate a batch of events, add the valid explicit ones to their users' realtime rows, quarantine the rest.

    Args:
        features: reads and writes the realtime rows (``FeastOnlineFeatures``).
        layout: the data root (quarantine files).
        metrics: counters to update (default: counters of a private registry).
        clock: unix seconds now (the future-time check and the rows' write stamps).
        max_len: events a realtime row keeps per user: the training cap, as the Feast definitions'
            ``REALTIME_MAX_LEN`` (not imported here: that imports Feast, seconds at a first request).
    """

    def __init__(
        self,
        features: RealtimeStore,
        layout: Layout,
        metrics: EventMetrics | None = None,
        clock: Callable[[], float] = time.time,
        max_len: int = MAX_SEQ_LEN,
    ) -> None:
        self.features = features
        self.quarantine = Quarantine(layout)
        self.layout = layout
        self.metrics = metrics or EventMetrics()
        self.clock = clock
        self.max_len = max_len
        self.locks = UserLocks()

    def ingest(self, events: Sequence[object]) -> dict[str, Any]:
        """Take one batch; see the module docstring.

        Returns:
            ``{received, accepted, added, duplicates, impressions, rejected, users, rejections: [{index,
            event_id, reasons}], quarantine}`` (``quarantine``: the file under the data root that got the
            rejected events, or None).

        Raises:
            Exception: the online store could not be read or written (nothing was quarantined or counted:
                send the batch again).
        """
        now_us = int(self.clock() * _US)
        rejected: list[tuple[int, object, list[str]]] = []
        by_user: dict[int, list[Event]] = {}
        impressions = 0
        for i, raw in enumerate(events):
            event, reasons = parse_event(raw, now_us)
            if event is None:
                rejected.append((i, raw, reasons))
            elif event.action == IMPRESSION:
                impressions += 1
            else:
                by_user.setdefault(event.user_id, []).append(event)

        added = duplicates = 0
        rows: dict[int, RealtimeSequence] = {}
        if by_user:
            with self.locks.hold(by_user):
                stored = self.features.realtime(sorted(by_user))
                for user, evs in by_user.items():
                    old = stored.get(user, RealtimeSequence())
                    merged, dups = old.merged([e.token() for e in evs], self.max_len)
                    duplicates += len(dups)
                    added += len(evs) - len(dups)
                    if len(dups) < len(evs):  # a newer stamp than the stored row's, so that every store takes it
                        rows[user] = replace(merged, written_us=max(now_us, old.written_us + 1))
                if rows:
                    self.features.push_realtime(rows)
        where = self.quarantine.write(rejected, now_us) if rejected else None

        accepted = len(events) - len(rejected)
        self.metrics.events.labels("accepted").inc(accepted - duplicates)
        self.metrics.events.labels("duplicate").inc(duplicates)
        self.metrics.events.labels("rejected").inc(len(rejected))
        for _, _, reasons in rejected:
            for reason in reasons:
                self.metrics.rejected.labels(reason).inc()
        if rejected:
            log.info("events: %d of %d rejected, quarantined in %s", len(rejected), len(events), where)
        return {
            "received": len(events),
            "accepted": accepted,
            "added": added,
            "duplicates": duplicates,
            "impressions": impressions,
            "rejected": len(rejected),
            "users": len(rows),
            "rejections": [
                {"index": i, "event_id": _event_id_preview(raw), "reasons": reasons} for i, raw, reasons in rejected
            ],
            "quarantine": None if where is None else str(where.relative_to(self.layout.root)),
        }


def _event_id_preview(raw: object) -> str | None:
    value = raw.get("event_id") if isinstance(raw, dict) else None
    if value is None:
        return None
    return value if isinstance(value, str) and len(value) <= PREVIEW_CHARS else preview(value)


# ------------------------------------------------------------------------ route
class EventsRequest(BaseModel):
    """Body of ``POST /v1/events``."""

    model_config = ConfigDict(extra="forbid")

    events: list[Any] = Field(
        description=(
            f"1 to {MAX_EVENTS} events, each checked on its own against the event contract: an object with "
            "event_id (string, unique), user_id and item_id (integers of the id domain), action, surface, "
            "ts (RFC 3339 date-time with an offset, e.g. 2026-01-04T10:00:00.123456Z), and optionally "
            "request_id (string) and dwell_ms (integer). An invalid event is rejected with its reasons "
            "(and quarantined), the others are taken."
        ),
        json_schema_extra={"minItems": 1, "maxItems": MAX_EVENTS},
    )

    @field_validator("events")
    @classmethod
    def _size(cls, v: list[Any]) -> list[Any]:
        if not 1 <= len(v) <= MAX_EVENTS:
            raise ValueError(f"events must hold 1 to {MAX_EVENTS} events, got {len(v)}")
        return v


class EventRejection(BaseModel):
    index: int = Field(description="Position of the event in the batch.")
    event_id: str | None = Field(description="The event's id as sent (a preview when long or not a string).")
    reasons: list[str] = Field(description="Why it was rejected: reason codes.")


class EventsResponse(BaseModel):
    """Answer of ``POST /v1/events``: what happened to each event of the batch."""

    received: int
    accepted: int = Field(description="Valid events (added, duplicates and impressions).")
    added: int = Field(description="Explicit events added to their users' realtime sequences.")
    duplicates: int = Field(description="Valid events whose event id was already stored (not added again).")
    impressions: int = Field(description="Valid impressions: counted, not part of the sequences.")
    rejected: int
    users: int = Field(description="Realtime sequences written.")
    rejections: list[EventRejection]
    quarantine: str | None = Field(description="Where the rejected events were kept, under the data root.")


def events_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
    """``POST /v1/events``."""
    router = APIRouter()
    counters = EventMetrics(metrics.registry)
    build_lock = threading.Lock()
    ingestor: EventIngestor | None = None  # built on the first batch, for the service's feature reader

    @router.post("/v1/events", response_model=EventsResponse, responses=error_responses(413, 422, 503))
    def events(req: EventsRequest) -> JSONResponse:
        """Take a batch of today's events into the realtime sequences; invalid ones are rejected with reasons."""
        nonlocal ingestor
        features = state.features
        if not (callable(getattr(features, "realtime", None)) and callable(getattr(features, "push_realtime", None))):
            return error_response(503, "this service's feature store takes no realtime events")
        if ingestor is None or ingestor.features is not features:
            with build_lock:
                if ingestor is None or ingestor.features is not features:
                    ingestor = EventIngestor(features, state.layout, counters)  # type: ignore[arg-type]
        try:
            result = ingestor.ingest(req.events)
        except Exception as exc:  # noqa: BLE001 - the store is down or not set up, or the quarantine is not writable
            log.warning("events not taken: %s", exc)
            return error_response(503, f"events not taken, send them again: {clip(describe(exc), 4 * PREVIEW_CHARS)}")
        return JSONResponse(content=result)

    return router
