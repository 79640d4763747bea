"""Where the service reads a user's sequence and stored embedding and the items' content: the Feast online store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.config import Layout
from features.contract import MIN_ID

log = logging.getLogger(__name__)

EVENT_TS = "event_ts_s"  # user_sequence's per-event unix seconds (features/feature_repo/definitions.py)
EVENT_TS_FEATURE = f"user_sequence:{EVENT_TS}"
USER_FEATURES = [
    "user_sequence:item_ids",
    "user_sequence:actions",
    "user_sequence:surfaces",
    EVENT_TS_FEATURE,
    "user_embedding:embedding",
    "user_embedding:model_version",
]
ITEM_FEATURES = ["item_features:content"]


@dataclass
class UserRow:
    """The online features of one user; ``None`` fields were not found."""

    sequence: dict | None = None  # {"item_ids", "actions", "surfaces"[, "ts"]}; ts: unix seconds per event
    embedding: list[float] | None = None
    model_version: str | None = None


class OnlineFeatures(Protocol):
    """Where the service reads features from (Feast by default).

    An implementation may also have ``warm_up() -> None``: called once at start, before the
    service reports ready, to open connections (raise when the store cannot be opened).
    Implementations without it are served as they are.
    """

    def status(self) -> str: ...

    def user(self, user_id: int) -> UserRow: ...

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]: ...


class FeastOnlineFeatures:
    """Reads the ranking features from the Feast online store under ``layout.feast``."""

    def __init__(self, layout: Layout) -> None:
        """Args:
        layout: The data root whose Feast registry and online store to read.
        """
        self.layout = layout
        self._store: Any = None
        self._lock = threading.Lock()
        self._has_event_ts = False  # once the registry has user_sequence's event times, it keeps them
        self._warned_no_event_ts = False

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

    def _user_features(self, fs: Any) -> list[str]:
        """USER_FEATURES, less the event times while the registry predates them (scored without gaps)."""
        if self._has_event_ts:
            return USER_FEATURES
        if EVENT_TS in {f.name for f in fs.get_feature_view("user_sequence").features}:
            self._has_event_ts = True
            return USER_FEATURES
        if not self._warned_no_event_ts:
            self._warned_no_event_ts = True
            log.warning(
                "the Feast registry's user_sequence view has no %s field: sequences are scored without time "
                "gaps; run `afm features register`, then re-export and materialize the sequences",
                EVENT_TS,
            )
        return [f for f in USER_FEATURES if f != EVENT_TS_FEATURE]

    def user(self, user_id: int) -> UserRow:
        """The user's sequence (with per-event times when stored) and stored embedding (``None`` where absent)."""
        fs = self._fs()
        got = fs.get_online_features(features=self._user_features(fs), entity_rows=[{"user_id": user_id}]).to_dict()
        row = UserRow()
        if got["item_ids"][0] is not None:
            row.sequence = {
                "item_ids": list(got["item_ids"][0]),
                "actions": list(got["actions"][0] or []),
                "surfaces": list(got["surfaces"][0] or []),
            }
            ts = (got.get(EVENT_TS) or [None])[0]
            if ts is not None and len(ts) == len(row.sequence["item_ids"]):
                row.sequence["ts"] = [int(t) for t in ts]  # unix seconds, aligned with item_ids
            elif ts is not None:
                log.warning(
                    "user %d: %d event times for %d events in the online store; scoring without time gaps",
                    user_id,
                    len(ts),
                    len(row.sequence["item_ids"]),
                )
        if got["embedding"][0] is not None:
            row.embedding = list(got["embedding"][0])
            row.model_version = got["model_version"][0]
        return row

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        """Content vectors of the items that have one in the online store."""
        got = (
            self._fs()
            .get_online_features(features=ITEM_FEATURES, entity_rows=[{"item_id": int(i)} for i in item_ids])
            .to_dict()
        )
        return {int(i): list(c) for i, c in zip(got["item_id"], got["content"], strict=True) if c is not None}
