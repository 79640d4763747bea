"""Parquet feature tables → padded tensors for the backbone and the ranker.

Sequences are right-padded (real tokens first, newest last) and truncated to the newest
``max_len`` events. Id 0 is padding for items, actions and surfaces; action and surface
ids come from :data:`features.contract.ACTION_IDS` / :data:`features.contract.SURFACE_IDS`.

Every sequence the ranker reads, offline (ranking examples) or online (the service's
sequence dicts), becomes tensors the same way: :func:`encode_sequences`, then
:meth:`SequenceArrays.tensors`. A ranker reads the newest
:func:`training.model.inputs.history_len` events; a candidate's age comes from
:meth:`ItemCreatedAt.age_at`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from features.config import Layout
from features.contract import ACTION_IDS, CONTENT_DIM, LABEL_ACTIONS, SURFACE_IDS, ContractError
from training.model.inputs import candidate_age_s


# --------------------------------------------------------------------------- reading
def read_partition(table: Path, ds: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read one ``ds=`` partition of a Spark-written parquet table.

    Args:
        table: the table folder (e.g. ``layout.ranking_examples``).
        ds: partition day.
        columns: columns to read (default all).
    """
    path = Layout.partition(table, ds)
    if not path.exists():
        raise FileNotFoundError(f"no partition {path} (available: {Layout(table.parent).available_days(table)})")
    return pq.read_table(path, columns=list(columns) if columns else None).to_pandas()


def latest_day(layout: Layout, table: Path) -> str:
    """The newest ``ds`` of ``table``; a clear error when there is none."""
    days = layout.available_days(table)
    if not days:
        raise FileNotFoundError(f"no partitions under {table}: run the feature pipeline first")
    return days[-1]


class ContentTable:
    """item_id → content vector lookup (zeros where an item has no content)."""

    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, dim: int = CONTENT_DIM) -> None:
        order = np.argsort(item_ids, kind="stable")
        self.ids = np.asarray(item_ids, dtype=np.int64)[order]  # (N,) sorted
        self.vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)[order]  # (N, C)
        self.dim = dim

    @classmethod
    def empty(cls, dim: int = CONTENT_DIM) -> ContentTable:
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), dim)

    @classmethod
    def from_layout(cls, layout: Layout, dim: int = CONTENT_DIM) -> ContentTable:
        """Load ``layout.items/items.parquet``; an empty table when the file is missing."""
        path = layout.items / "items.parquet"
        if not path.exists():
            return cls.empty(dim)
        return cls.from_frame(pq.read_table(path, columns=["item_id", "content"]).to_pandas(), dim)

    @classmethod
    def from_frame(cls, items: pd.DataFrame, dim: int = CONTENT_DIM) -> ContentTable:
        """Build from a frame with ``item_id`` and ``content`` (list of floats or null)."""
        ids, vecs = [], []
        for item_id, content in zip(items["item_id"].to_numpy(), items["content"].to_numpy(), strict=True):
            if content is None or (isinstance(content, float) and np.isnan(content)):
                continue
            vec = np.asarray(content, dtype=np.float32)
            if vec.shape != (dim,):
                raise ContractError(f"item {item_id}: content has {vec.size} values, expected CONTENT_DIM={dim}")
            ids.append(int(item_id))
            vecs.append(vec)
        if not ids:
            return cls.empty(dim)
        return cls(np.array(ids, np.int64), np.stack(vecs), dim)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """(...,) int64 ids → (..., C) float32 vectors, zeros for unknown ids and padding."""
        flat = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((flat.size, self.dim), np.float32)
        if len(self.ids):
            pos = np.searchsorted(self.ids, flat).clip(max=len(self.ids) - 1)
            hit = self.ids[pos] == flat
            out[hit] = self.vectors[pos[hit]]
        return out.reshape(*np.shape(item_ids), self.dim)


# -------------------------------------------------------------------------- encoding
def encode_actions(actions: Sequence[str]) -> np.ndarray:
    """Action names → ids; ContractError naming an unknown action."""
    try:
        return np.array([ACTION_IDS[a] for a in actions], dtype=np.int64)
    except KeyError as exc:
        raise ContractError(f"unknown action {exc.args[0]!r}; expected one of {sorted(ACTION_IDS)}") from None


def encode_surfaces(surfaces: Sequence[str]) -> np.ndarray:
    """Surface names → ids; ContractError naming an unknown surface."""
    try:
        return np.array([SURFACE_IDS[s] for s in surfaces], dtype=np.int64)
    except KeyError as exc:
        raise ContractError(f"unknown surface {exc.args[0]!r}; expected one of {sorted(SURFACE_IDS)}") from None


def _as_list(x: object) -> list:
    if x is None:
        return []
    if isinstance(x, float) and np.isnan(x):
        return []
    return list(x)  # type: ignore[arg-type]


@dataclass
class SequenceArrays:
    """Right-padded sequences as numpy arrays: all (N, L) int64 plus lengths (N,).

    ``ts`` (N, L) int64 unix seconds of each event (0 at padding), when the source had them.
    """

    item_ids: np.ndarray
    action_ids: np.ndarray
    surface_ids: np.ndarray
    lengths: np.ndarray
    ts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def tensors(self, rows: np.ndarray | slice, content: ContentTable | None, device: torch.device | str = "cpu"):
        """Selected rows as backbone inputs, trimmed to the longest selected sequence (≥ 1 column).

        Returns:
            dict with item_ids, action_ids, surface_ids (B, L') int64, pad_mask (B, L') bool,
            content (B, L', C) float32 or None, and ts (B, L') int64 seconds when known.
        """
        lengths = self.lengths[rows]
        width = max(1, int(lengths.max()) if len(lengths) else 1)
        ids = self.item_ids[rows, :width]
        out = {
            "item_ids": torch.from_numpy(np.ascontiguousarray(ids)).to(device),
            "action_ids": torch.from_numpy(np.ascontiguousarray(self.action_ids[rows, :width])).to(device),
            "surface_ids": torch.from_numpy(np.ascontiguousarray(self.surface_ids[rows, :width])).to(device),
            "pad_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]).to(device),
            "content": None,
        }
        if self.ts is not None:
            out["ts"] = torch.from_numpy(np.ascontiguousarray(self.ts[rows, :width])).to(device)  # (B, L') seconds
        if content is not None and len(content):
            out["content"] = torch.from_numpy(content.lookup(ids)).to(device)
        return out


def encode_sequences(
    item_ids: Sequence[Sequence[int]],
    actions: Sequence[Sequence[str]],
    surfaces: Sequence[Sequence[str]],
    max_len: int,
    timestamps: Sequence[Sequence] | None = None,
) -> SequenceArrays:
    """Lists of per-row sequences (oldest first) → right-padded arrays of the newest ``max_len`` events.

    Args:
        item_ids: per row, the item ids.
        actions: per row, action names (same length as the row's item ids).
        surfaces: per row, surface names.
        max_len: keep at most this many newest events.
        timestamps: per row, event times (datetime64 arrays or int unix seconds), or None.
    """
    n = len(item_ids)
    out_i = np.zeros((n, max_len), np.int64)
    out_a = np.zeros((n, max_len), np.int64)
    out_s = np.zeros((n, max_len), np.int64)
    out_t = np.zeros((n, max_len), np.int64) if timestamps is not None else None
    lengths = np.zeros(n, np.int64)
    for r, (ii, aa, ss) in enumerate(zip(item_ids, actions, surfaces, strict=True)):
        ii, aa, ss = _as_list(ii), _as_list(aa), _as_list(ss)
        if not (len(ii) == len(aa) == len(ss)):
            raise ContractError(
                f"sequence row {r}: item_ids/actions/surfaces have different lengths {len(ii)}/{len(aa)}/{len(ss)}"
            )
        ii, aa, ss = ii[-max_len:], aa[-max_len:], ss[-max_len:]
        k = len(ii)
        lengths[r] = k
        if k:
            out_i[r, :k] = np.asarray(ii, dtype=np.int64)
            out_a[r, :k] = encode_actions(aa)
            out_s[r, :k] = encode_surfaces(ss)
        if out_t is not None and k:
            tt = _as_list(timestamps[r])
            if len(tt) < k:
                raise ContractError(f"sequence row {r}: {len(tt)} timestamps for {k} events")
            out_t[r, :k] = to_unix_seconds(tt[-k:])
    return SequenceArrays(out_i, out_a, out_s, lengths, out_t)


def to_unix_seconds(values: Sequence | np.ndarray) -> np.ndarray:
    """Timestamps (datetime64, pandas/Python datetimes or int seconds) → int64 unix seconds."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind != "M":
        arr = pd.to_datetime(pd.Series(list(values)), utc=True).dt.tz_localize(None).to_numpy()
    return arr.astype("datetime64[s]").astype(np.int64)


def encode_sequence_frame(df: pd.DataFrame, max_len: int) -> SequenceArrays:
    """Encode a frame with ``item_ids``, ``actions``, ``surfaces`` list columns."""
    missing = [c for c in ("item_ids", "actions", "surfaces") if c not in df.columns]
    if missing:
        raise ContractError(f"sequence table lacks columns {missing}")
    ts = df["ts"].tolist() if "ts" in df.columns else None
    return encode_sequences(df["item_ids"].tolist(), df["actions"].tolist(), df["surfaces"].tolist(), max_len, ts)


# -------------------------------------------------------------------------- ranking
@dataclass
class RankingData:
    """Impressions grouped by request: one sequence per request, many impressions each.

    Attributes:
        sequences: the requests' sequences (R rows).
        request_ids: (R,) request id strings.
        req_index: (N,) row of ``sequences`` of every impression.
        item_ids: (N,) candidate item ids.
        surface_ids: (N,) surface ids.
        labels: (N, A) float32 labels in ``LABEL_ACTIONS`` order.
        days: the ``ds`` values it came from.
        request_ts: (R,) int64 unix seconds of each request (0 where unknown).
    """

    sequences: SequenceArrays
    request_ids: np.ndarray
    req_index: np.ndarray
    item_ids: np.ndarray
    surface_ids: np.ndarray
    labels: np.ndarray
    days: list[str]
    request_ts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def request_batches(self, target_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Impression indices grouped by whole requests, ~``target_size`` impressions per batch.

        Args:
            target_size: impressions per batch (a batch closes once it reaches this).
            rng: shuffle requests with it; None keeps file order.
        """
        order = np.argsort(self.req_index, kind="stable")
        bounds = np.flatnonzero(np.diff(self.req_index[order])) + 1
        groups = np.split(order, bounds) if len(order) else []
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        batches, cur, size = [], [], 0
        for g in groups:
            cur.append(g)
            size += len(g)
            if size >= target_size:
                batches.append(np.concatenate(cur))
                cur, size = [], 0
        if cur:
            batches.append(np.concatenate(cur))
        return batches


def load_ranking_data(layout: Layout, days: Sequence[str], max_len: int) -> RankingData:
    """Join ``ranking_examples`` with ``request_sequences`` (on request_id) for the given days.

    Impressions whose request has no stored sequence get an empty sequence (a new user).
    """
    label_cols = [f"label_{a}" for a in LABEL_ACTIONS]
    ex_frames, seq_frames = [], []
    for ds in days:
        ex = read_partition(layout.ranking_examples, ds)
        missing = [c for c in ("request_id", "item_id", "surface", *label_cols) if c not in ex.columns]
        if missing:
            raise ContractError(f"ranking_examples ds={ds} lacks columns {missing}")
        ex_frames.append(ex[["request_id", "item_id", "surface", *label_cols]])
        seq = read_partition(
            layout.request_sequences, ds, columns=["request_id", "request_ts", "item_ids", "actions", "surfaces", "ts"]
        ).drop_duplicates("request_id")
        seq_frames.append(seq)
    ex = pd.concat(ex_frames, ignore_index=True)
    seq = pd.concat(seq_frames, ignore_index=True).drop_duplicates("request_id")
    req_ids = pd.Index(pd.unique(ex["request_id"].astype(str)))
    seq = seq.assign(request_id=seq["request_id"].astype(str)).set_index("request_id").reindex(req_ids)
    sequences = encode_sequence_frame(seq.reset_index(drop=True), max_len)
    request_ts = np.zeros(len(req_ids), np.int64)
    known = seq["request_ts"].notna().to_numpy()
    if known.any():
        request_ts[known] = to_unix_seconds(seq["request_ts"].to_numpy()[known])
    labels = ex[label_cols].fillna(0).to_numpy(np.float32)
    return RankingData(
        sequences=sequences,
        request_ids=np.asarray(req_ids),
        req_index=req_ids.get_indexer(ex["request_id"].astype(str)).astype(np.int64),
        item_ids=ex["item_id"].to_numpy(np.int64),
        surface_ids=encode_surfaces(ex["surface"].tolist()),
        labels=labels,
        days=list(days),
        request_ts=request_ts,
    )


def candidate_slots(inverse: np.ndarray, n_rows: int) -> tuple[np.ndarray, int]:
    """Place impressions into a (rows, width) candidate grid, one row per request.

    Args:
        inverse: (N,) row (request) of every impression, in [0, n_rows).
        n_rows: number of rows.

    Returns:
        (slot (N,), width): impression i goes to ``[inverse[i], slot[i]]``; width = the
        largest number of impressions of one row (≥ 1).
    """
    inverse = np.asarray(inverse, dtype=np.int64)
    if inverse.size == 0:
        return np.zeros(0, np.int64), 1
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty_like(inverse)
    slot[order] = np.arange(inverse.size) - starts[inverse[order]]
    return slot, int(counts.max())


class ItemCreatedAt:
    """item_id → creation time (unix seconds); -1 for unknown items. Sorted-array lookup."""

    def __init__(self, item_ids: np.ndarray, created_s: np.ndarray) -> None:
        order = np.argsort(item_ids, kind="stable")
        self.ids = np.asarray(item_ids, dtype=np.int64)[order]
        self.created = np.asarray(created_s, dtype=np.int64)[order]

    @classmethod
    def from_layout(cls, layout: Layout) -> ItemCreatedAt:
        """From ``layout.items/items.parquet`` (``item_id``, ``created_at``); empty when absent."""
        path = layout.items / "items.parquet"
        if not path.exists():
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        t = pq.read_table(path, columns=["item_id", "created_at"]).to_pandas()
        return cls(t["item_id"].to_numpy(np.int64), to_unix_seconds(t["created_at"].to_numpy()))

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """(...,) ids → (...,) int64 creation seconds, -1 where unknown."""
        flat = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        out = np.full(flat.size, -1, np.int64)
        if len(self.ids):
            pos = np.searchsorted(self.ids, flat).clip(max=len(self.ids) - 1)
            hit = self.ids[pos] == flat
            out[hit] = self.created[pos[hit]]
        return out.reshape(np.shape(item_ids))

    def age_at(self, item_ids: np.ndarray, request_ts: np.ndarray | int) -> np.ndarray:
        """(...,) ids → (...,) int64 age in seconds at ``request_ts`` (broadcast), -1 where unknown.

        The one rule of :func:`training.model.inputs.candidate_age_s`, for fine-tuning,
        evaluation and serving alike.
        """
        return candidate_age_s(self.lookup(item_ids), request_ts)
