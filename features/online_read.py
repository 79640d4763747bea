"""Feast's online store read at the level of its online-store interface: one view, many keys, the values decoded.

``FeatureStore.get_online_features`` resolves feature references against the registry,
groups them by view, reads each view through the provider's ``online_read`` and then builds
and converts a response object, on every call. A scoring request always asks the same
views for the same features, so the service resolves the views once and calls
``Provider.online_read`` (the call ``get_online_features`` makes) directly: the rows
it returns are those ``get_online_features`` would return, decoded here from Feast's
``ValueProto`` into plain Python values.

Example::

    reader = OnlineViewReader(feature_store(layout))
    rows = reader.read("item_features", "item_id", [3, 4], ["content"])
    rows[0].values["content"]  # list of floats, or rows[0] is None when item 3 has no row
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OnlineRow:
    """One entity's stored values of one view: ``values`` by feature name (None where unset), stamped ``event_ts``."""

    values: dict[str, Any]
    event_ts: dt.datetime | None


def decode_value(value: Any) -> Any:
    """A Feast ``ValueProto`` → its Python value: a list for list types, the scalar otherwise, None when unset."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    got = getattr(value, kind)
    return list(got.val) if kind.endswith("_list_val") else got


class OnlineViewReader:
    """Reads views of a Feast store's online store by entity key, with the views resolved once.

    Args:
        fs: the ``feast.FeatureStore`` whose registry and online store to read.
        refresh_s: a resolved view is looked up in the registry again after this many seconds,
            so a view registered anew (more fields) is read as such within that time.
    """

    def __init__(self, fs: Any, refresh_s: float = 60.0) -> None:
        from feast.infra.provider import get_provider
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self.fs = fs
        self._provider = get_provider(fs.config)  # the kind of provider get_online_features reads through
        self.refresh_s = refresh_s
        self._views: dict[str, tuple[float, Any]] = {}  # name → (when resolved, view)
        self._lock = threading.Lock()
        self._entity_key, self._value = EntityKey, Value

    def view(self, name: str) -> Any:
        """The registry's feature view ``name`` (looked up again every ``refresh_s`` seconds)."""
        now = time.monotonic()
        found = self._views.get(name)
        if found is None or now - found[0] > self.refresh_s:
            with self._lock:
                found = (now, self.fs.get_feature_view(name, allow_registry_cache=True))
                self._views[name] = found
        return found[1]

    def has_field(self, view: str, field: str) -> bool:
        """Whether the registry's ``view`` has ``field``."""
        return field in {f.name for f in self.view(view).features}

    def read(self, view: str, join_key: str, ids: Sequence[int], features: Sequence[str]) -> list[OnlineRow | None]:
        """The rows of ``view`` for the int64 entity ids ``ids`` (one per id, in order; None where absent).

        Args:
            view: a feature view name.
            join_key: its entity's join key (``user_id``, ``item_id``).
            ids: entity ids.
            features: the view's features to read.
        """
        if not len(ids):
            return []
        keys = [self._entity_key(join_keys=[join_key], entity_values=[self._value(int64_val=int(i))]) for i in ids]
        got = self._provider.online_read(
            config=self.fs.config, table=self.view(view), entity_keys=keys, requested_features=list(features)
        )
        out: list[OnlineRow | None] = []
        for event_ts, values in got:
            if not values:
                out.append(None)
                continue
            out.append(OnlineRow({f: decode_value(values[f]) if f in values else None for f in features}, event_ts))
        return out
