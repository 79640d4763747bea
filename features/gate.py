"""The raw-events gate: schema check, row checks, valid/quarantine split, Great Expectations on both sides.

For day ``ds``:

1. Read ``raw/events/ds=…``; a missing partition or a schema that is not the event
   contract fails with a message naming the path / the columns.
2. Tag every row with reason codes (several may apply; ``reason`` joins them with ";"):
   ``null_<col>`` for each required column, ``unknown_action``, ``unknown_surface``,
   ``ts_out_of_day`` (not in ``[ds 00:00, ds+1 00:00)`` UTC — catches future timestamps),
   ``duplicate_event_id`` (every occurrence of an ``event_id`` but the earliest, by
   ``ts`` and then file order, within the partition).
3. Run the GX ``raw_events`` suite on the raw partition and record its unexpected
   counts next to the gate's counts (they must agree per reason; GX's uniqueness check
   counts every copy of a duplicated id, the gate keeps the first copy valid).
4. Write quarantined rows (raw columns + ``reason``) and valid rows, each partition
   overwritten as one sorted file, so a rerun writes the same content.
5. Check ``rows_in == rows_valid + rows_quarantined`` (raises if not), fail when no
   row is valid (after writing the quarantine), and run the same GX suite on the
   valid output, which must pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from features import quality
from features.config import Layout, day_window
from features.contract import (
    ACTIONS,
    EVENT_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    SURFACES,
    ContractError,
    check_event_schema,
)
from features.spark import (
    configure_session,
    conform,
    has_parquet,
    remove_partition,
    write_partition,
    write_report,
)
from features.tables import QUARANTINE_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SUITE = "raw_events"
DUPLICATE = "duplicate_event_id"
#: Every reason code the gate can give, in the order they are joined.
REASONS: tuple[str, ...] = (
    *(f"null_{c}" for c in REQUIRED_EVENT_COLUMNS),
    "unknown_action",
    "unknown_surface",
    "ts_out_of_day",
    DUPLICATE,
)


class GateError(RuntimeError):
    """The gate refused a partition (no valid rows, counts that do not reconcile, valid output failing GX)."""


def tag_reasons(raw: DataFrame, ds: str) -> DataFrame:
    """Add ``reason`` (";"-joined reason codes, empty when the row is valid) and helper columns.

    Helper columns: ``_file``/``_pos`` (file order), ``_copy`` (1 = earliest row of its event_id),
    ``_copies`` (rows sharing the event_id).

    Args:
        raw: raw events with the contract's columns.
        ds: the partition day (defines the allowed ``ts`` range).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    start, end = day_window(ds)
    df = raw.withColumn("_file", F.input_file_name()).withColumn("_pos", F.monotonically_increasing_id())
    first = Window.partitionBy("event_id").orderBy(F.col("ts").asc_nulls_last(), "_file", "_pos")
    ts = F.col("ts")
    checks = [F.when(F.col(c).isNull(), F.lit(f"null_{c}")) for c in REQUIRED_EVENT_COLUMNS]
    checks += [
        F.when(F.col("action").isNotNull() & ~F.col("action").isin(*ACTIONS), F.lit("unknown_action")),
        F.when(F.col("surface").isNotNull() & ~F.col("surface").isin(*SURFACES), F.lit("unknown_surface")),
        F.when(ts.isNotNull() & ((ts < F.lit(start)) | (ts >= F.lit(end))), F.lit("ts_out_of_day")),
        F.when(F.col("event_id").isNotNull() & (F.col("_copy") > 1), F.lit(DUPLICATE)),
    ]
    df = df.withColumn("_copy", F.row_number().over(first)).withColumn(
        "_copies", F.count(F.lit(1)).over(Window.partitionBy("event_id"))
    )
    return df.withColumn("reason", F.concat_ws(";", *checks))  # concat_ws skips the NULLs of passing checks


def _read_raw(spark: SparkSession, layout: Layout, ds: str) -> DataFrame:
    from pyspark.sql import functions as F

    path = Layout.partition(layout.raw_events, ds)
    if not has_parquet(path):
        raise FileNotFoundError(
            f"raw events partition not found: {path} has no parquet files (generate or import ds={ds})"
        )
    raw = spark.read.parquet(str(path))
    check_event_schema(raw.dtypes, str(path))
    # timestamp_ntz is accepted by the contract and read as UTC (the session time zone)
    return raw.select(*[F.col(c).cast("timestamp").alias(c) if c == "ts" else F.col(c) for c in EVENT_COLUMNS])


def run_gate(spark: SparkSession, layout: Layout, ds: str) -> dict[str, Any]:
    """Validate raw events of ``ds``; write ``valid/events/ds=…`` and ``quarantine/events/ds=…``.

    Args:
        spark: the session (see :func:`features.spark.spark_session`).
        layout: data root.
        ds: partition day ``YYYY-MM-DD``.

    Returns:
        ``{rows_in, rows_valid, rows_quarantined, by_reason: {reason: n}, gx: {suite: success},
        gx_unexpected_raw: {reason: n}, gx_agrees, ...}`` (also written to ``reports/ds=…/gate.json``).

    Raises:
        FileNotFoundError: the raw partition is missing.
        ContractError: the raw partition's schema is not the event contract.
        GateError: no valid row, counts that do not reconcile, or the valid output fails GX.
    """
    configure_session(spark)
    raw = _read_raw(spark, layout, ds)
    tagged = tag_reasons(raw, ds).persist()
    try:
        return _gate(spark, layout, ds, tagged)
    finally:
        tagged.unpersist()


def _gate(spark: SparkSession, layout: Layout, ds: str, tagged: DataFrame) -> dict[str, Any]:
    from pyspark.sql import functions as F

    valid_path = Layout.partition(layout.valid_events, ds)
    quarantine_path = Layout.partition(layout.quarantine_events, ds)

    stats = tagged.agg(
        F.count(F.lit(1)).alias("rows_in"),
        F.sum(F.when(F.col("reason") == "", 1).otherwise(0)).alias("valid"),
        F.sum(
            F.when(F.col("event_id").isNotNull() & (F.col("_copy") == 1) & (F.col("_copies") > 1), 1).otherwise(0)
        ).alias("dup_ids"),
        *[F.sum(F.array_contains(F.split("reason", ";"), r).cast("int")).alias(r) for r in REASONS],
    ).collect()[0]
    rows_in = int(stats["rows_in"])
    rows_valid_expected = int(stats["valid"] or 0)
    dup_ids = int(stats["dup_ids"] or 0)
    by_reason = {r: int(stats[r]) for r in sorted(REASONS) if stats[r]}
    bad = tagged.where(F.col("reason") != "")
    good = tagged.where(F.col("reason") == "")

    # GX on the raw partition: recorded, not required to pass (bad rows are what the gate is for).
    raw_summary = quality.run_suite(
        tagged.select(*EVENT_COLUMNS), SUITE, quality.raw_events_expectations(ds), ds, layout=layout, label="raw"
    )
    gx_unexpected = quality.unexpected_by_reason(raw_summary)
    expected_from_gate = {r: by_reason.get(r, 0) for r in gx_unexpected}
    if DUPLICATE in expected_from_gate:
        expected_from_gate[DUPLICATE] += dup_ids  # GX counts the kept first copy of each duplicated id too
    gx_agrees = expected_from_gate == gx_unexpected
    if not gx_agrees:
        log.warning(
            "GX raw_events counts %s disagree with the gate's %s for ds=%s", gx_unexpected, expected_from_gate, ds
        )

    order = ["ts", "event_id", "_file", "_pos"]
    conform(bad, QUARANTINE_SCHEMA, str(quarantine_path))
    write_partition(bad, quarantine_path, order, columns=QUARANTINE_SCHEMA.names)
    rows_quarantined = spark.read.parquet(str(quarantine_path)).count()

    result: dict[str, Any] = {
        "step": "gate",
        "ds": ds,
        "rows_in": rows_in,
        "rows_quarantined": rows_quarantined,
        "by_reason": by_reason,
        "duplicated_event_ids": dup_ids,
        "gx": {f"{SUITE}:raw": raw_summary["success"]},
        "gx_unexpected_raw": gx_unexpected,
        "gx_agrees": gx_agrees,
        "valid_path": str(valid_path),
        "quarantine_path": str(quarantine_path),
        "gx_results": [raw_summary],
    }

    if rows_valid_expected == 0:
        remove_partition(valid_path)  # a stale valid partition from an earlier run must not survive
        result.update(rows_valid=0, status="failed")
        write_report(layout, ds, "gate", result)
        raise GateError(
            f"gate ds={ds}: no valid rows among {rows_in} raw events (all quarantined to {quarantine_path}; "
            f"reasons {by_reason})"
        )

    write_partition(good, valid_path, order, columns=list(EVENT_COLUMNS))
    valid = spark.read.parquet(str(valid_path)).persist()
    try:
        rows_valid = valid.count()
        result["rows_valid"] = rows_valid
        if rows_in != rows_valid + rows_quarantined:
            remove_partition(valid_path)
            raise GateError(
                f"gate ds={ds}: counts do not reconcile: rows_in {rows_in} != valid {rows_valid} + quarantined "
                f"{rows_quarantined}"
            )
        valid_summary = quality.validate_output(
            valid, SUITE, quality.raw_events_expectations(ds), ds, layout=layout, label="valid"
        )
    finally:
        valid.unpersist()
    result["gx"][f"{SUITE}:valid"] = valid_summary["success"]
    result["gx_results"].append(valid_summary)
    if not valid_summary["success"]:
        remove_partition(valid_path)
        result["status"] = "failed"
        write_report(layout, ds, "gate", result)
        try:
            quality.require_success(valid_summary, str(valid_path))
        except quality.QualityError as exc:
            raise GateError(f"gate ds={ds} failed: {exc}") from exc

    result["status"] = "ok"
    write_report(layout, ds, "gate", result)
    return result


__all__ = ["ContractError", "GateError", "run_gate", "tag_reasons"]
