"""Pretraining corpus: the ``user_sequences`` snapshot of D cut into segments of at most ``segment_len``.

Segments are cut from the newest end, so a user's last segment is their newest
``segment_len`` events and only the oldest segment can be shorter. ``segment`` numbers
them oldest first from 0. Users with fewer than 2 events are skipped, and so is an
oldest remainder of a single event (a one-event segment has no next-token target).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from features import quality
from features.config import Layout
from features.sequences import SEQ_COLUMNS
from features.spark import (
    StagedPartition,
    configure_session,
    conform,
    finish_step,
    read_partition,
    write_partition,
)
from features.tables import PRETRAIN_CORPUS_SCHEMA, SEGMENT_LEN

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

MIN_SEGMENT_LEN = 2


def segment_sequences(snapshot: DataFrame, segment_len: int) -> DataFrame:
    """Cut each user's sequence into segments of at most ``segment_len`` events, aligned to the newest event.

    Args:
        snapshot: a user_sequences frame.
        segment_len: maximum events per segment.

    Returns:
        A frame with ``tables.PRETRAIN_CORPUS_SCHEMA``'s columns.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    length = F.lit(segment_len)
    users = snapshot.withColumn("_n", F.size("item_ids")).where(F.col("_n") >= MIN_SEGMENT_LEN)
    users = users.withColumn("_k", F.ceil(F.col("_n") / length).cast("int"))
    cut = users.select("*", F.posexplode(F.sequence(F.lit(0), F.col("_k") - 1)).alias("_pos", "_i"))
    # segment i covers positions [end - L, end) (0-based), end = n - (k - 1 - i) * L, clipped at 0
    end = F.col("_n") - (F.col("_k") - 1 - F.col("_i")) * length
    start = F.greatest(end - length, F.lit(0))
    cut = cut.withColumn("_start", start).withColumn("_len", end - start)
    cut = cut.where(F.col("_len") >= MIN_SEGMENT_LEN)
    renumber = Window.partitionBy("user_id").orderBy("_i")
    return cut.select(
        "user_id",
        (F.row_number().over(renumber) - 1).cast("int").alias("segment"),
        *[F.slice(c, F.col("_start") + 1, F.col("_len")).alias(c) for c in SEQ_COLUMNS],
    )


def build_pretrain_corpus(
    spark: SparkSession, layout: Layout, ds: str, segment_len: int = SEGMENT_LEN
) -> dict[str, Any]:
    """Write ``pretrain_corpus/ds=…`` from the ``user_sequences`` snapshot of ``ds``.

    Args:
        spark: the session.
        layout: data root.
        ds: snapshot day.
        segment_len: maximum events per segment (≥ 2).

    Returns:
        ``{segments, users, events, users_skipped, gx: {...}, path, ...}`` (also in ``reports/ds=…/corpus.json``).

    Raises:
        FileNotFoundError: the ds snapshot is missing (build sequences first).
        quality.QualityError: the output fails the ``pretrain_corpus`` suite (nothing is published; see ``finish_step``).
    """
    from pyspark.sql import functions as F

    if segment_len < MIN_SEGMENT_LEN:
        raise ValueError(f"segment_len must be >= {MIN_SEGMENT_LEN}, got {segment_len}")
    configure_session(spark)
    snap_path = Layout.partition(layout.user_sequences, ds)
    snapshot = read_partition(
        spark, snap_path, "user_sequences", hint=f"build it first: afm features sequences --ds {ds}"
    )
    corpus = conform(segment_sequences(snapshot, segment_len), PRETRAIN_CORPUS_SCHEMA, f"pretrain_corpus ds={ds}")
    path = Layout.partition(layout.pretrain_corpus, ds)
    staged = StagedPartition.beside(path)
    write_partition(corpus, staged.staged, ["user_id", "segment"])
    out = spark.read.parquet(str(staged.staged))
    stats = out.agg(
        F.count(F.lit(1)).alias("segments"),
        F.countDistinct("user_id").alias("users"),
        F.sum(F.size("item_ids")).alias("events"),
    ).collect()[0]
    snapshot_users = snapshot.count()
    summary = quality.validate_output(
        quality.sequence_view(out),
        "pretrain_corpus",
        quality.pretrain_corpus_expectations(segment_len),
        ds,
        layout=layout,
    )
    result: dict[str, Any] = {
        "step": "corpus",
        "ds": ds,
        "segment_len": segment_len,
        "segments": int(stats["segments"]),
        "users": int(stats["users"]),
        "events": int(stats["events"] or 0),
        "users_skipped": snapshot_users - int(stats["users"]),
        "gx": {"pretrain_corpus": summary["success"]},
        "gx_results": [summary],
        "path": str(path),
    }
    return finish_step(layout, ds, "corpus", result, [(summary, staged)])
