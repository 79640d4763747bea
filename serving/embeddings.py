"""Batch user embeddings: the CURRENT ranker over the latest user_sequences snapshot → Feast.

Each embedding row carries the ranker version that computed it; the scoring service uses a
stored embedding only when that version is the one it serves.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from features.config import Layout
from features.store import FeatureStoreError, write_user_embeddings

log = logging.getLogger(__name__)

BATCH_SIZE = 512
SEQUENCE_COLUMNS = ["user_id", "item_ids", "actions", "surfaces"]
#: Per-event times of the snapshot (list of UTC timestamps); read when present.
TS_COLUMN = "ts"


def latest_snapshot_day(layout: Layout) -> str:
    """The newest ``ds`` under ``layout.user_sequences``.

    Args:
        layout: The data root.

    Raises:
        FeatureStoreError: when there is no snapshot.
    """
    days = layout.available_days(layout.user_sequences)
    if not days:
        raise FeatureStoreError(f"no user_sequences snapshot under {layout.user_sequences}; run the feature jobs first")
    return days[-1]


def _unix_seconds_lists(column: pa.Array | pa.ChunkedArray) -> list[list[int] | None]:
    """A list<timestamp> column → per row, the times in unix seconds (None for a null row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_list(column.type) or not pa.types.is_timestamp(column.type.value_type):
        raise FeatureStoreError(f"user_sequences column {TS_COLUMN!r} must be a list of timestamps, got {column.type}")
    secs = pc.cast(column, pa.list_(pa.timestamp("s", tz="UTC")), safe=False)  # drops sub-second parts
    return secs.cast(pa.list_(pa.int64())).to_pylist()


def iter_sequence_batches(
    layout: Layout, ds: str, batch_size: int = BATCH_SIZE
) -> Iterator[tuple[list[int], list[dict]]]:
    """Yield ``(user_ids, sequences)`` batches of the ``ds`` snapshot.

    Each sequence has ``item_ids``, ``actions``, ``surfaces`` and, when the snapshot has
    them, ``ts``: the events' times in unix seconds (what the online ``event_ts_s`` holds).

    Args:
        layout: The data root.
        ds: Snapshot day.
        batch_size: Users per batch.
    """
    path = layout.partition(layout.user_sequences, ds)
    data = pads.dataset(str(path), format="parquet", partitioning=None)
    missing = [c for c in SEQUENCE_COLUMNS if c not in data.schema.names]
    if missing:
        raise FeatureStoreError(f"user_sequences ds={ds} at {path} lacks columns {missing}")
    with_ts = TS_COLUMN in data.schema.names
    columns = SEQUENCE_COLUMNS + ([TS_COLUMN] if with_ts else [])
    for batch in data.to_batches(columns=columns, batch_size=batch_size):
        cols = batch.select(SEQUENCE_COLUMNS).to_pydict()
        sequences = [
            {"item_ids": list(i or []), "actions": list(a or []), "surfaces": list(s or [])}
            for i, a, s in zip(cols["item_ids"], cols["actions"], cols["surfaces"], strict=True)
        ]
        if with_ts:
            for seq, ts in zip(sequences, _unix_seconds_lists(batch.column(TS_COLUMN)), strict=True):
                if ts is not None and len(ts) == len(seq["item_ids"]):
                    seq["ts"] = ts  # else unknown: scored without time gaps, as the service does
        yield [int(u) for u in cols["user_id"]], sequences


def publish_user_embeddings(
    layout: Layout,
    model_loader: Callable[[], Any] | None = None,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Compute every user's embedding with the CURRENT ranker and publish it to Feast (offline + online).

    Args:
        layout: The data root.
        model_loader: Returns the model (default: ``serving.model.load_ranker(layout)``).
        batch_size: Users per forward pass.

    A model exported with quantized tables (``afm model export``) has ``user_embedding_bits``
    8 or 4: its embeddings are stored per-row quantized (``user_embedding:embedding_q``).

    Returns:
        ``{"model_version", "n_users", "ds", "embedding_format", "seconds"}``.
    """
    t0 = time.perf_counter()
    if model_loader is None:
        from serving.model import load_ranker

        model = load_ranker(layout)
    else:
        model = model_loader()
    ds = latest_snapshot_day(layout)
    published_at = dt.datetime.now(dt.UTC)

    user_ids: list[int] = []
    chunks: list[np.ndarray] = []
    for ids, sequences in iter_sequence_batches(layout, ds, batch_size):
        emb = np.asarray(model.user_embeddings(sequences), dtype=np.float32)  # (U, D)
        if emb.shape != (len(ids), model.embedding_dim):
            raise FeatureStoreError(
                f"model {model.version} returned embeddings of shape {emb.shape}, expected ({len(ids)}, {model.embedding_dim})"
            )
        user_ids.extend(ids)
        chunks.append(emb)
    if not user_ids:
        raise FeatureStoreError(f"user_sequences ds={ds} has no users; nothing to publish")

    matrix = np.concatenate(chunks, axis=0)  # (N, D)
    frame = pd.DataFrame(
        {
            "user_id": np.asarray(user_ids, dtype=np.int64),
            "embedding": list(matrix),
            "model_version": model.version,
            "event_timestamp": published_at,
        }
    )
    bits = getattr(model, "user_embedding_bits", None)  # an exported model's format (ServingModel); None = float32
    write_user_embeddings(layout, frame, bits=bits)
    summary = {
        "model_version": model.version,
        "n_users": len(user_ids),
        "ds": ds,
        "embedding_format": "fp32" if bits is None else f"int{bits}",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("published user embeddings: %s", summary)
    return summary
