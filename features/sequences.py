"""User sequence snapshots: ``user_sequences/ds=D = user_sequences/ds=D-1 ⊕ explicit valid events of D``.

Each row is one user's last ``max_len`` explicit actions (no impressions), oldest first,
ordered by ``(ts, event_id)``; ``n_events`` counts every explicit event ever (uncapped).

The snapshot is incremental: day D only reads D's valid events and D-1's snapshot. The
gate guarantees that every event of D lies inside day D, so D's events all come after
the snapshot's, and appending them keeps the order. :func:`full_recompute_user_sequences`
rebuilds the same table from every valid partition up to D (the reference the tests
compare the incremental path with, and what ``from_scratch=True`` writes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from features import quality
from features.config import Layout, previous_ds
from features.contract import IMPRESSION
from features.spark import (
    StagedPartition,
    configure_session,
    conform,
    finish_step,
    has_parquet,
    read_partition,
    write_partition,
)
from features.tables import MAX_SEQ_LEN, USER_SEQUENCES_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

SEQ_COLUMNS: tuple[str, ...] = ("item_ids", "actions", "surfaces", "ts")
#: struct field of an event → sequence array column
_EVENT_FIELDS: dict[str, str] = {"item_id": "item_ids", "action": "actions", "surface": "surfaces", "ts": "ts"}


class SequenceError(RuntimeError):
    """A sequence job cannot run as asked (e.g. the previous day's snapshot is missing)."""


def read_valid_events(spark: SparkSession, layout: Layout, ds: str) -> DataFrame:
    """Valid events of ``ds`` (the gate's output), with an error naming the missing path.

    Args:
        spark: the session.
        layout: data root.
        ds: partition day.
    """
    path = Layout.partition(layout.valid_events, ds)
    return read_partition(spark, path, "valid events", hint=f"run the gate first: afm features gate --ds {ds}")


def explicit_only(events: DataFrame) -> DataFrame:
    """Explicit actions only (every action but impressions).

    Args:
        events: valid events.
    """
    from pyspark.sql import functions as F

    return events.where(F.col("action") != IMPRESSION)


def event_struct() -> Column:
    """``struct(ts, event_id, item_id, action, surface)``: sorting these sorts by (ts, event_id)."""
    from pyspark.sql import functions as F

    return F.struct("ts", "event_id", "item_id", "action", "surface")


def take_last(arr: Column, max_len: int) -> Column:
    """The last ``max_len`` elements of an array column (the whole array when shorter).

    Args:
        arr: array column.
        max_len: how many elements to keep.
    """
    from pyspark.sql import functions as F

    return F.slice(arr, F.greatest(F.size(arr) - F.lit(max_len) + F.lit(1), F.lit(1)), max_len)


def unzip_events(df: DataFrame, evs: str, keep: list[str]) -> DataFrame:
    """Turn a sorted ``array<event struct>`` column into the sequence array columns.

    Args:
        df: frame holding ``evs``.
        evs: name of the array-of-structs column (fields of :func:`event_struct`).
        keep: other columns to keep.
    """
    from pyspark.sql import functions as F

    return df.select(*keep, *[F.col(evs)[field].alias(col) for field, col in _EVENT_FIELDS.items()])


def aggregate_sequences(events: DataFrame, max_len: int) -> DataFrame:
    """Per user: the last ``max_len`` events ordered by (ts, event_id), plus the uncapped count ``n``.

    Args:
        events: explicit events (contract columns).
        max_len: sequence cap.

    Returns:
        ``user_id, item_ids, actions, surfaces, ts, n``.
    """
    from pyspark.sql import functions as F

    agg = events.groupBy("user_id").agg(
        F.array_sort(F.collect_list(event_struct())).alias("evs"), F.count(F.lit(1)).alias("n")
    )
    agg = agg.withColumn("evs", take_last(F.col("evs"), max_len))
    return unzip_events(agg, "evs", ["user_id", "n"])


def _empty_array(like: str) -> Column:
    from pyspark.sql import functions as F

    element = {"item_ids": "bigint", "actions": "string", "surfaces": "string", "ts": "timestamp"}[like]
    return F.array().cast(f"array<{element}>")


def append_sequences(
    prev: DataFrame, later: DataFrame, keys: list[str], max_len: int, how: str = "full_outer"
) -> DataFrame:
    """``prev`` sequences followed by ``later`` sequences per key, capped to the last ``max_len``.

    Args:
        prev: earlier sequences: ``keys`` + the sequence arrays.
        later: newer sequences: ``keys`` + the sequence arrays (+ other columns, kept).
        keys: join key columns (e.g. ``["user_id"]``).
        max_len: sequence cap.
        how: join type (``full_outer`` keeps keys present on one side only; ``left`` keeps ``later``'s keys).

    Returns:
        ``keys`` + ``later``'s other columns + ``item_ids, actions, surfaces, ts``.
    """
    from pyspark.sql import functions as F

    others = [c for c in later.columns if c not in keys and c not in SEQ_COLUMNS]
    p = prev.select(*keys, *[F.col(c).alias(f"_p_{c}") for c in SEQ_COLUMNS])
    d = later.select(*keys, *others, *[F.col(c).alias(f"_d_{c}") for c in SEQ_COLUMNS])
    j = d.join(p, keys, how)
    merged = [
        take_last(
            F.concat(F.coalesce(F.col(f"_p_{c}"), _empty_array(c)), F.coalesce(F.col(f"_d_{c}"), _empty_array(c))),
            max_len,
        ).alias(c)
        for c in SEQ_COLUMNS
    ]
    return j.select(*keys, *others, *merged)


def previous_snapshot(spark: SparkSession, layout: Layout, ds: str) -> DataFrame | None:
    """The ``user_sequences`` snapshot of ``ds - 1``; None when ``ds`` is the first day with data.

    Args:
        spark: the session.
        layout: data root.
        ds: the day being built.

    Raises:
        SequenceError: the ds-1 snapshot is missing although valid events of earlier days exist.
    """
    prev = previous_ds(ds)
    path = Layout.partition(layout.user_sequences, prev)
    if has_parquet(path):
        return spark.read.parquet(str(path))
    earlier = [d for d in layout.available_days(layout.valid_events) if d < ds]
    if earlier:
        raise SequenceError(
            f"user_sequences snapshot of ds={prev} is missing ({path}) but valid events exist for earlier days "
            f"({earlier[0]} … {earlier[-1]}): build ds={prev} first (afm features sequences --ds {prev}), "
            f"or rebuild ds={ds} from all valid partitions with from_scratch=True"
        )
    return None


def full_recompute_user_sequences(
    spark: SparkSession, layout: Layout, ds: str, max_len: int = MAX_SEQ_LEN
) -> DataFrame:
    """The ``user_sequences`` snapshot of ``ds`` recomputed from every valid partition ≤ ``ds``.

    Args:
        spark: the session.
        layout: data root.
        ds: snapshot day.
        max_len: sequence cap.

    Returns:
        A frame with ``tables.USER_SEQUENCES_SCHEMA`` (not written).
    """
    from pyspark.sql import functions as F

    configure_session(spark)
    days = [d for d in layout.available_days(layout.valid_events) if d <= ds]
    paths = [
        str(Layout.partition(layout.valid_events, d))
        for d in days
        if has_parquet(Layout.partition(layout.valid_events, d))
    ]
    if not paths:
        raise FileNotFoundError(
            f"no valid events partitions up to ds={ds} under {layout.valid_events}: run the gate first"
        )
    events = explicit_only(spark.read.parquet(*paths))
    seq = aggregate_sequences(events, max_len)
    seq = seq.withColumn("last_ts", F.element_at("ts", -1)).withColumnRenamed("n", "n_events")
    return conform(seq, USER_SEQUENCES_SCHEMA, f"user_sequences ds={ds} (full recompute)")


def _incremental(spark: SparkSession, layout: Layout, ds: str, max_len: int) -> DataFrame:
    from pyspark.sql import functions as F

    day = aggregate_sequences(explicit_only(read_valid_events(spark, layout, ds)), max_len)
    prev = previous_snapshot(spark, layout, ds)
    if prev is None:
        seq = day.withColumnRenamed("n", "n_events")
    else:
        counts = prev.select("user_id", F.col("n_events").alias("_prev_n"))
        merged = append_sequences(prev, day, ["user_id"], max_len)
        seq = merged.join(counts, "user_id", "left").withColumn(
            "n_events", F.coalesce("_prev_n", F.lit(0)) + F.coalesce("n", F.lit(0))
        )
    seq = seq.withColumn("last_ts", F.element_at("ts", -1))
    return conform(seq, USER_SEQUENCES_SCHEMA, f"user_sequences ds={ds}")


def build_user_sequences(
    spark: SparkSession, layout: Layout, ds: str, max_len: int = MAX_SEQ_LEN, *, from_scratch: bool = False
) -> dict[str, Any]:
    """Build and write the ``user_sequences/ds=…`` snapshot (incremental from ds-1 unless ``from_scratch``).

    Args:
        spark: the session.
        layout: data root.
        ds: snapshot day.
        max_len: how many of the newest explicit events to keep per user.
        from_scratch: recompute from every valid partition ≤ ds instead of ds-1's snapshot.

    Returns:
        ``{users, events_today, users_capped, gx: {suite: success}, path, ...}`` (also in ``reports/ds=…/sequences.json``).

    Raises:
        FileNotFoundError: the valid events of ds are missing (run the gate).
        SequenceError: the ds-1 snapshot is missing while earlier data exists.
        quality.QualityError: the output fails the ``user_sequences`` suite (nothing is published; see ``finish_step``).
    """
    from pyspark.sql import functions as F

    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    configure_session(spark)
    valid = read_valid_events(spark, layout, ds)
    events_today = explicit_only(valid).count()
    seq = (
        full_recompute_user_sequences(spark, layout, ds, max_len)
        if from_scratch
        else _incremental(spark, layout, ds, max_len)
    )

    path = Layout.partition(layout.user_sequences, ds)
    staged = StagedPartition.beside(path)
    write_partition(seq, staged.staged, ["user_id"])
    out = spark.read.parquet(str(staged.staged))
    stats = out.agg(
        F.count(F.lit(1)).alias("users"),
        F.sum(F.when(F.col("n_events") > F.size("item_ids"), 1).otherwise(0)).alias("capped"),
        F.sum(F.size("item_ids")).alias("stored_events"),
    ).collect()[0]
    summary = quality.validate_output(
        quality.sequence_view(out), "user_sequences", quality.user_sequences_expectations(max_len), ds, layout=layout
    )
    result: dict[str, Any] = {
        "step": "sequences",
        "ds": ds,
        "mode": "full" if from_scratch else "incremental",
        "max_len": max_len,
        "events_today": events_today,
        "users": int(stats["users"]),
        "users_capped": int(stats["capped"] or 0),
        "stored_events": int(stats["stored_events"] or 0),
        "gx": {"user_sequences": summary["success"]},
        "gx_results": [summary],
        "path": str(path),
    }
    return finish_step(layout, ds, "sequences", result, [(summary, staged)])
