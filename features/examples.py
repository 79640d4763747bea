"""Ranking examples of day D and the user's sequence as of each request (point in time).

- ``ranking_examples/ds=D``: one row per (request_id, item_id) impression of D (the
  earliest impression when an item was shown twice in a request), with
  ``label_<a> = 1`` when a valid event of D has action ``a`` (a LABEL_ACTION) for the
  same request_id and item_id. Impressions without a request_id are skipped (counted).
- ``request_sequences/ds=D``: one row per request: ``request_ts`` = the earliest
  impression of the request, its user and surface, and the user's explicit sequence
  strictly before ``request_ts``: the ds-1 snapshot followed by D's explicit events with
  ``ts < request_ts``, the last ``max_len``.

Point in time: no sequence event may be at or after its request time. The job checks
this on the data it is about to write (and raises :class:`PointInTimeError`), and the
GX ``request_sequences`` suite checks it again on the written partition.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from features import quality
from features.config import Layout
from features.contract import IMPRESSION, LABEL_ACTIONS, ContractError
from features.sequences import (
    append_sequences,
    event_struct,
    explicit_only,
    previous_snapshot,
    read_valid_events,
    take_last,
    unzip_events,
)
from features.spark import (
    StagedPartition,
    configure_session,
    conform,
    finish_step,
    write_partition,
)
from features.tables import MAX_SEQ_LEN, RANKING_EXAMPLES_SCHEMA, REQUEST_SEQUENCES_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


class PointInTimeError(RuntimeError):
    """A request sequence holds an event at or after its request time (label leakage)."""


def impressions_with_requests(valid: DataFrame) -> DataFrame:
    """Impressions that carry a request_id.

    Args:
        valid: valid events of one day.
    """
    from pyspark.sql import functions as F

    return valid.where((F.col("action") == IMPRESSION) & F.col("request_id").isNotNull())


def ranking_examples(valid: DataFrame) -> DataFrame:
    """One row per (request_id, item_id) impression with 0/1 labels per LABEL_ACTION.

    Args:
        valid: valid events of one day.

    Returns:
        A frame with ``tables.RANKING_EXAMPLES_SCHEMA``'s columns.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    first = Window.partitionBy("request_id", "item_id").orderBy("ts", "event_id")
    shown = (
        impressions_with_requests(valid)
        .withColumn("_rn", F.row_number().over(first))
        .where(F.col("_rn") == 1)
        .select("request_id", "user_id", "item_id", "surface", F.col("ts").alias("impression_ts"))
    )
    acted = valid.where(F.col("action").isin(*LABEL_ACTIONS) & F.col("request_id").isNotNull())
    labels = acted.groupBy("request_id", "item_id").agg(
        *[F.max(F.when(F.col("action") == a, 1).otherwise(0)).cast("int").alias(f"label_{a}") for a in LABEL_ACTIONS]
    )
    out = shown.join(labels, ["request_id", "item_id"], "left")
    out = out.fillna(0, subset=[f"label_{a}" for a in LABEL_ACTIONS])
    return out.select(
        "request_id",
        "user_id",
        "item_id",
        "surface",
        "impression_ts",
        *[F.col(f"label_{a}").cast("int").alias(f"label_{a}") for a in LABEL_ACTIONS],
    )


def requests_of(valid: DataFrame) -> DataFrame:
    """One row per request: ``request_id, user_id, request_ts, surface`` (from its earliest impression).

    Args:
        valid: valid events of one day.

    Raises:
        ContractError: a request_id is shared by several users.
    """
    from pyspark.sql import functions as F

    req = (
        impressions_with_requests(valid)
        .groupBy("request_id")
        .agg(
            F.min(F.struct("ts", "event_id", "user_id", "surface")).alias("first"),
            F.countDistinct("user_id").alias("_users"),
        )
    )
    shared = req.where(F.col("_users") > 1).select("request_id").limit(5).collect()
    if shared:
        raise ContractError(f"request_id shared by several users: {[r['request_id'] for r in shared]}")
    return req.select(
        "request_id",
        F.col("first.user_id").alias("user_id"),
        F.col("first.ts").alias("request_ts"),
        F.col("first.surface").alias("surface"),
    )


def request_sequences(requests: DataFrame, day_events: DataFrame, prev: DataFrame | None, max_len: int) -> DataFrame:
    """Each request's user sequence strictly before ``request_ts``: ``prev`` snapshot ⊕ day events before the request.

    Args:
        requests: ``request_id, user_id, request_ts, surface``.
        day_events: the day's explicit valid events.
        prev: the previous day's user_sequences snapshot, or None.
        max_len: sequence cap.

    Returns:
        A frame with ``tables.REQUEST_SEQUENCES_SCHEMA``'s columns.
    """
    from pyspark.sql import functions as F

    ev = day_events.select(F.col("user_id").alias("_uid"), F.col("ts").alias("_ev_ts"), event_struct().alias("_ev"))
    joined = requests.join(ev, (requests["user_id"] == ev["_uid"]) & (ev["_ev_ts"] < requests["request_ts"]), "left")
    before = joined.groupBy("request_id", "user_id", "request_ts", "surface").agg(
        F.array_sort(F.collect_list("_ev")).alias("evs")  # collect_list drops the NULL of requests with no event
    )
    before = before.withColumn("evs", take_last(F.col("evs"), max_len))
    seq = unzip_events(before, "evs", ["request_id", "user_id", "request_ts", "surface"])
    if prev is not None:
        seq = append_sequences(prev, seq, ["user_id"], max_len, how="left")
    return seq


def point_in_time_violations(seq: DataFrame) -> int:
    """Number of request sequences holding an event at or after the request time (must be 0).

    Args:
        seq: a request_sequences frame.
    """
    from pyspark.sql import functions as F

    return seq.where(F.exists("ts", lambda t: t >= F.col("request_ts"))).count()


def _example_figures(ex_out: DataFrame, seq_out: DataFrame) -> dict[str, Any]:
    """Counts of the written examples and request sequences, and examples whose request has no sequence row."""
    from pyspark.sql import functions as F

    counts = ex_out.agg(
        F.count(F.lit(1)).alias("examples"), *[F.sum(f"label_{a}").alias(a) for a in LABEL_ACTIONS]
    ).collect()[0]
    seq_stats = seq_out.agg(
        F.count(F.lit(1)).alias("requests"),
        F.sum(F.when(F.size("item_ids") == 0, 1).otherwise(0)).alias("empty"),
        F.avg(F.size("item_ids")).alias("mean_len"),
    ).collect()[0]
    return {
        "examples": int(counts["examples"]),
        "positives": {a: int(counts[a] or 0) for a in LABEL_ACTIONS},
        "requests": int(seq_stats["requests"]),
        "requests_with_empty_sequence": int(seq_stats["empty"] or 0),
        "mean_sequence_len": float(seq_stats["mean_len"] or 0.0),
        # every example's request has a sequence row (they come from the same impressions)
        "orphans": ex_out.join(seq_out.select("request_id"), "request_id", "left_anti").count(),
    }


def build_ranking_examples(spark: SparkSession, layout: Layout, ds: str, max_len: int = MAX_SEQ_LEN) -> dict[str, Any]:
    """Write ``ranking_examples/ds=…`` and ``request_sequences/ds=…`` for day ``ds``.

    Args:
        spark: the session.
        layout: data root.
        ds: partition day.
        max_len: how many of the newest explicit events each request sequence keeps.

    Returns:
        ``{examples, requests, impressions_without_request, positives: {action: n}, gx: {...}, ...}``
        (also in ``reports/ds=…/examples.json``).

    Raises:
        FileNotFoundError: valid events of ds are missing.
        SequenceError: the ds-1 snapshot is missing while earlier data exists.
        PointInTimeError: a sequence event is at or after its request time (nothing is written).
        quality.QualityError: an output fails its GX suite (nothing is published; see ``finish_step``).
    """
    from pyspark.sql import functions as F

    configure_session(spark)
    valid = read_valid_events(spark, layout, ds).persist()
    ex_path = Layout.partition(layout.ranking_examples, ds)
    seq_path = Layout.partition(layout.request_sequences, ds)
    ex_out_staged, seq_out_staged = StagedPartition.beside(ex_path), StagedPartition.beside(seq_path)
    seq = None
    try:
        prev = previous_snapshot(spark, layout, ds)
        examples = conform(ranking_examples(valid), RANKING_EXAMPLES_SCHEMA, f"ranking_examples ds={ds}")
        seq = request_sequences(requests_of(valid), explicit_only(valid), prev, max_len)
        seq = conform(seq, REQUEST_SEQUENCES_SCHEMA, f"request_sequences ds={ds}").persist()
        violations = point_in_time_violations(seq)
        if violations:
            raise PointInTimeError(
                f"request_sequences ds={ds}: {violations} requests hold sequence events at or after the request time"
            )
        no_request = valid.where((F.col("action") == IMPRESSION) & F.col("request_id").isNull()).count()
        write_partition(examples, ex_out_staged.staged, ["request_id", "item_id"])
        write_partition(seq, seq_out_staged.staged, ["request_id"])
    finally:
        valid.unpersist()
        if seq is not None:
            seq.unpersist()

    ex_out = spark.read.parquet(str(ex_out_staged.staged))
    seq_out = spark.read.parquet(str(seq_out_staged.staged))
    figures = _example_figures(ex_out, seq_out)
    orphans = figures.pop("orphans")
    ex_summary = quality.validate_output(
        ex_out, "ranking_examples", quality.ranking_examples_expectations(), ds, layout=layout
    )
    seq_summary = quality.validate_output(
        quality.request_sequence_view(seq_out),
        "request_sequences",
        quality.request_sequences_expectations(max_len),
        ds,
        layout=layout,
    )
    result: dict[str, Any] = {
        "step": "examples",
        "ds": ds,
        "max_len": max_len,
        **figures,
        "impressions_without_request": no_request,
        "examples_without_request_sequence": orphans,
        "point_in_time_violations": 0,
        "gx": {"ranking_examples": ex_summary["success"], "request_sequences": seq_summary["success"]},
        "gx_results": [ex_summary, seq_summary],
        "examples_path": str(ex_path),
        "request_sequences_path": str(seq_path),
    }
    failure = f"{orphans} examples have no request_sequences row" if orphans else None
    return finish_step(
        layout, ds, "examples", result, [(ex_summary, ex_out_staged), (seq_summary, seq_out_staged)], failure
    )
