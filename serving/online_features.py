"""Where the service reads a user's sequence and stored embedding and the items' content: the Feast online store.

A user's sequence at a request is built as the training examples build it
(``features.examples.request_sequences``): the daily snapshot (``user_sequence``, the end of
the newest materialized day) followed by the user's realtime events (``user_realtime_sequence``,
pushed by ``POST /v1/events``) that came after the snapshot and strictly before the request
time, ordered by (time, event id), one per event id, the newest ``MAX_SEQ_LEN``
(:func:`merge_sequences`). The realtime events are written here too
(:meth:`FeastOnlineFeatures.push_realtime`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.config import Layout
from features.contract import MIN_ID
from features.feature_repo.definitions import QUANTIZED_EMBEDDING_FIELD
from features.online_read import OnlineViewReader
from features.store import REALTIME_VIEW, RealtimeSequence, realtime_features, realtime_row
from features.tables import MAX_SEQ_LEN

log = logging.getLogger(__name__)

EVENT_TS = "event_ts_s"  # user_sequence's per-event unix seconds (features/feature_repo/definitions.py)
SNAPSHOT_FIELDS = ("item_ids", "actions", "surfaces")  # + EVENT_TS where the registry has it
EMBEDDING_FIELDS = ("embedding", "model_version")  # + the quantized embedding where the registry has it
#: Seconds a found item content vector is served from memory (env AFM_ITEM_CONTENT_TTL_S; 0 = read every time).
CONTENT_TTL_S = 300.0
CONTENT_CACHE_ITEMS = 1_000_000  # more cached vectors than this: the cache starts over
_US = 1_000_000


@dataclass
class UserRow:
    """The online features of one user; ``None`` fields were not found."""

    sequence: dict | None = None  # {"item_ids", "actions", "surfaces"[, "ts"]}; ts: unix seconds per event
    embedding: list[float] | None = None
    model_version: str | None = None
    realtime_events: int = 0  # how many of the sequence's events came from the realtime row (after the snapshot)


class OnlineFeatures(Protocol):
    """Where the service reads features from (Feast by default).

    An implementation may also have ``warm_up() -> None``: called once at start, before the
    service reports ready, to open connections (raise when the store cannot be opened).
    Implementations without it are served as they are. ``user`` may also take ``before_us``
    (the request time, unix microseconds: only events strictly before it); it is passed only
    when the request carries a time and the implementation's ``user`` has that parameter.
    """

    def status(self) -> str: ...

    def user(self, user_id: int) -> UserRow: ...

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]: ...


class RealtimeStore(Protocol):
    """What ``POST /v1/events`` needs: read and replace users' realtime rows (``FeastOnlineFeatures`` has both)."""

    def realtime(self, user_ids: Sequence[int]) -> dict[int, RealtimeSequence]: ...

    def push_realtime(self, rows: dict[int, RealtimeSequence]) -> int: ...


def merge_sequences(
    snapshot: dict | None,
    snapshot_end_us: int | None,
    realtime: RealtimeSequence | None,
    before_us: int | None = None,
    max_len: int = MAX_SEQ_LEN,
) -> tuple[dict | None, int]:
    """A request's sequence: the snapshot, then the realtime events after it and before the request, the newest ``max_len``.

    The construction of the training examples (``features.examples.request_sequences``): the
    previous day's snapshot followed by the day's explicit events strictly before the request
    time, in (time, event id) order, capped at ``max_len``.

    Args:
        snapshot: the ``user_sequence`` row (``item_ids``, ``actions``, ``surfaces``, optionally
            ``ts`` in unix seconds), or None for a user without one.
        snapshot_end_us: the time up to which the snapshot holds every event (unix microseconds,
            exclusive); realtime events before it are the snapshot's own (or were refused by the
            daily gate) and are left out. None: no snapshot, every realtime event counts.
        realtime: the user's realtime row (events in (time, event id) order), or None.
        before_us: the request time (unix microseconds): only events strictly before it count;
            None: every event.
        max_len: how many of the newest events the sequence keeps (the training cap).

    Returns:
        ``(sequence, realtime_events)``: the sequence (``ts`` in unix seconds when the snapshot
        has times or there is none; None when the user has neither a snapshot nor a realtime
        event) and how many of its events came from the realtime row.
    """
    fresh: list[tuple[int, str, int, str, str]] = []
    if realtime is not None:
        seen: set[str] = set()
        for ev in sorted(realtime.events(), key=lambda e: (e[0], e[1])):
            ts_us, event_id = ev[0], ev[1]
            if event_id in seen or (snapshot_end_us is not None and ts_us < snapshot_end_us):
                continue
            if before_us is not None and ts_us >= before_us:
                continue
            seen.add(event_id)
            fresh.append(ev)
    if snapshot is None and not fresh:
        return None, 0
    base = snapshot or {"item_ids": [], "actions": [], "surfaces": [], "ts": []}
    items, actions, surfaces = list(base["item_ids"]), list(base["actions"]), list(base["surfaces"])
    ts = None if base.get("ts") is None else [int(t) for t in base["ts"]]
    if before_us is not None and ts is not None:  # a request older than the snapshot: its events before the request
        keep = [i for i, t in enumerate(ts) if t * _US < before_us]
        if len(keep) < len(ts):
            items, actions, surfaces = ([x[i] for i in keep] for x in (items, actions, surfaces))
            ts = [ts[i] for i in keep]
    items += [e[2] for e in fresh]
    actions += [e[3] for e in fresh]
    surfaces += [e[4] for e in fresh]
    start = max(len(items) - max_len, 0)
    sequence: dict[str, list] = {"item_ids": items[start:], "actions": actions[start:], "surfaces": surfaces[start:]}
    if ts is not None:
        sequence["ts"] = (ts + [e[0] // _US for e in fresh])[start:]  # unix seconds (floored), as training reads them
    return sequence, min(len(fresh), len(sequence["item_ids"]))


def realtime_fields() -> list[str]:
    """The realtime view's field names (its features less the entity key)."""
    return [ref.split(":", 1)[1] for ref in realtime_features()]


class FeastOnlineFeatures:
    """Reads the ranking features from the Feast online store under ``layout.feast``, and writes the realtime rows."""

    def __init__(self, layout: Layout, max_len: int = MAX_SEQ_LEN) -> None:
        """Args:
        layout: The data root whose Feast registry and online store to read.
        max_len: How many of the newest events a merged sequence keeps (the training examples' cap).
        """
        self.layout = layout
        self.max_len = max_len
        self._store: Any = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one push at a time (the SQLite store shares one connection)
        self._has_event_ts = False  # once the registry has user_sequence's event times, it keeps them
        self._warned_no_event_ts = False
        self._has_realtime = False  # once the registry has the realtime view, it keeps it
        self._warned_no_realtime = False
        self._online: OnlineViewReader | None = None
        self.content_ttl_s = float(os.environ.get("AFM_ITEM_CONTENT_TTL_S", CONTENT_TTL_S))
        self._content_cache: dict[int, list[float]] = {}
        self._content_cached_at = time.monotonic()

    def _fs(self) -> Any:
        from features.store import FeatureStoreError, feature_store, is_registered, registry_location

        if self._store is None:
            with self._lock:
                if self._store is None:
                    if not is_registered(self.layout):
                        raise FeatureStoreError(
                            f"no Feast registry at {registry_location(self.layout)}; run `afm features register`"
                        )
                    self._store = feature_store(self.layout)
        return self._store

    @property
    def is_open(self) -> bool:
        """Whether the Feast store was opened (by ``warm_up`` or a first read)."""
        return self._store is not None

    def warm_up(self) -> None:
        """Open the store and read one user's and one item's rows, so the first request pays neither.

        Raises:
            FeatureStoreError: when there is no Feast registry under ``layout.feast``.
        """
        started = time.perf_counter()
        self._fs()
        self.user(MIN_ID)  # an unknown id reads as absent: what matters is the connection and the registry
        self.item_content([MIN_ID])
        log.info("feature store open and read in %.2f s", time.perf_counter() - started)

    def status(self) -> str:
        """``"ok"`` when the registry exists, else a short reason."""
        from features.store import FeatureStoreError, is_registered

        try:
            return "ok" if is_registered(self.layout) else "not registered (run `afm features register`)"
        except FeatureStoreError as exc:  # a SQL registry that cannot be reached
            return str(exc)

    def _reader(self) -> OnlineViewReader:
        """The online-store reader of the open store (views resolved once a minute, see :mod:`features.online_read`)."""
        if self._online is None:
            fs = self._fs()
            with self._lock:
                if self._online is None:
                    self._online = OnlineViewReader(fs)
        return self._online

    def _snapshot_fields(self, reader: OnlineViewReader) -> list[str]:
        """user_sequence's fields to read, less what the registry predates (event times: scored without gaps)."""
        if not self._has_event_ts:
            if reader.has_field("user_sequence", EVENT_TS):
                self._has_event_ts = True
            else:
                if not self._warned_no_event_ts:
                    self._warned_no_event_ts = True
                    log.warning(
                        "the Feast registry's user_sequence view has no %s field: sequences are scored without time "
                        "gaps; run `afm features register`, then re-export and materialize the sequences",
                        EVENT_TS,
                    )
                return list(SNAPSHOT_FIELDS)
        return [*SNAPSHOT_FIELDS, EVENT_TS]

    def _realtime_registered(self, fs: Any) -> bool:
        """Whether the registry has the realtime view (a registry from before it: snapshot only, warned once)."""
        if not self._has_realtime:
            if REALTIME_VIEW in {v.name for v in fs.list_feature_views(allow_cache=True)}:
                self._has_realtime = True
            elif not self._warned_no_realtime:
                self._warned_no_realtime = True
                log.warning(
                    "the Feast registry has no %s view: sequences are served from the daily snapshot only and "
                    "POST /v1/events is refused; run `afm features register`",
                    REALTIME_VIEW,
                )
        return self._has_realtime

    def user(self, user_id: int, before_us: int | None = None) -> UserRow:
        """The user's sequence at a request and stored embedding (``None`` where absent).

        The sequence is the snapshot followed by the realtime events after it (and strictly before
        ``before_us``, the request time in unix microseconds, when given): :func:`merge_sequences`.
        The views are read through Feast's online store (:class:`features.online_read.OnlineViewReader`).
        """
        from features.store import stored_user_embedding

        fs = self._fs()
        reader = self._reader()
        row = UserRow()
        snapshot, snapshot_end_us = None, None
        got = reader.read("user_sequence", "user_id", [user_id], self._snapshot_fields(reader))[0]
        if got is not None and got.values["item_ids"] is not None:
            values = got.values
            snapshot = {
                "item_ids": list(values["item_ids"]),
                "actions": list(values["actions"] or []),
                "surfaces": list(values["surfaces"] or []),
            }
            ts = values.get(EVENT_TS)
            if ts is not None and len(ts) == len(snapshot["item_ids"]):
                snapshot["ts"] = [int(t) for t in ts]  # unix seconds, aligned with item_ids
            elif ts is not None:
                log.warning(
                    "user %d: %d event times for %d events in the online store; scoring without time gaps",
                    user_id,
                    len(ts),
                    len(snapshot["item_ids"]),
                )
            # a snapshot is stamped with the last microsecond of its day and holds every event up to then;
            # taken in whole seconds (as Feast's responses give it), it covers up to the end of that second
            stamp_s = int(got.event_ts.timestamp()) if got.event_ts is not None else 0
            snapshot_end_us = (stamp_s + 1) * _US if stamp_s else None
        realtime = None
        if self._realtime_registered(fs):
            names = realtime_fields()
            rt = reader.read(REALTIME_VIEW, "user_id", [user_id], names)[0]
            if rt is not None:
                realtime = realtime_row({f"{REALTIME_VIEW}__{n}": [rt.values[n]] for n in names}, 0)
        row.sequence, row.realtime_events = merge_sequences(
            snapshot, snapshot_end_us, realtime, before_us, self.max_len
        )
        fields = list(EMBEDDING_FIELDS)
        if reader.has_field("user_embedding", QUANTIZED_EMBEDDING_FIELD):
            fields.append(QUANTIZED_EMBEDDING_FIELD)
        emb = reader.read("user_embedding", "user_id", [user_id], fields)[0]
        if emb is not None:
            stored = {f"user_embedding__{f}": [emb.values[f]] for f in fields}
            row.embedding, row.model_version = stored_user_embedding(fs, stored, user_id)  # float32, or decoded
        return row

    def realtime(self, user_ids: Sequence[int]) -> dict[int, RealtimeSequence]:
        """The users' stored realtime rows (users without one are left out).

        Raises:
            FeatureStoreError: the registry has no realtime view (run ``afm features register``).
        """
        from features.store import read_realtime_sequences

        fs = self._fs()
        self._require_realtime(fs)
        return read_realtime_sequences(fs, list(user_ids))

    def push_realtime(self, rows: dict[int, RealtimeSequence]) -> int:
        """Replace the users' realtime rows in the online store (through the push source); returns the rows written."""
        from features.store import push_realtime_sequences

        fs = self._fs()
        self._require_realtime(fs)
        with self._write_lock:
            return push_realtime_sequences(fs, rows)

    def _require_realtime(self, fs: Any) -> None:
        from features.store import FeatureStoreError, registry_location

        if not self._realtime_registered(fs):
            raise FeatureStoreError(
                f"the Feast registry at {registry_location(self.layout)} has no {REALTIME_VIEW} view; "
                "run `afm features register`"
            )

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        """Content vectors of the items that have one in the online store.

        Found vectors are kept in memory for ``content_ttl_s`` seconds (an item's content is
        written once, when it is created); items without one are read again every time, so a
        new item's content is served as soon as it is materialized.
        """
        ids = [int(i) for i in item_ids]
        cache = self._content_cache
        now = time.monotonic()
        expired = now - self._content_cached_at > self.content_ttl_s
        if self.content_ttl_s <= 0 or expired or len(cache) > CONTENT_CACHE_ITEMS:
            cache = self._content_cache = {}
            self._content_cached_at = now
        missing = [i for i in dict.fromkeys(ids) if i not in cache]
        if missing:
            rows = self._reader().read("item_features", "item_id", missing, ["content"])
            for i, got in zip(missing, rows, strict=True):
                if got is not None and got.values["content"] is not None:
                    cache[i] = list(got.values["content"])
        return {i: cache[i] for i in ids if i in cache}
