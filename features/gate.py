"""The raw-events gate: schema check, row checks, valid/quarantine split, Great Expectations on both sides.

For day ``ds``:

1. List ``raw/events/ds=…`` and check **every** data file's parquet footer against the
   event contract (missing, unexpected or mistyped columns, unreadable files), naming
   the file. Names starting with ``_`` or ``.`` (which Spark skips) are listed in the
   report; such a file holding parquet data is refused, since its rows would be lost.
2. Tag every row with reason codes (several may apply; ``reason`` joins them with ";"):
   ``null_<col>`` for each required column, ``user_id_out_of_domain`` /
   ``item_id_out_of_domain`` (below ``MIN_ID``: 0 is the models' padding id),
   ``unknown_action``, ``unknown_surface``,
   ``ts_out_of_day`` (not in ``[ds 00:00, ds+1 00:00)`` UTC — catches future timestamps),
   ``duplicate_event_id`` (every occurrence of an ``event_id`` but the earliest, by
   ``ts`` and then file order, within the partition).
3. Run the GX ``raw_events`` suite on the raw partition and record its unexpected
   counts next to the gate's counts (they must agree per reason; GX's uniqueness check
   counts every copy of a duplicated id, the gate keeps the first copy valid).
4. Write quarantined rows (raw columns + ``reason``) and valid rows aside (staged), each
   as one sorted file, so a rerun writes the same content.
5. Check ``rows_in == rows_valid + rows_quarantined``, fail when no row is valid, and run
   the same GX suite on the valid output, which must pass. Only then are both outputs
   published; a failed run leaves the day's earlier outputs exactly as they were and keeps
   its own under ``failed/ds=…/gate/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features import quality
from features.config import Layout, day_window
from features.contract import (
    ACTIONS,
    EVENT_COLUMNS,
    ID_COLUMNS,
    MIN_ID,
    REQUIRED_EVENT_COLUMNS,
    SURFACES,
    ContractError,
    check_event_schema,
    id_domain_reason,
)
from features.spark import (
    StagedPartition,
    arrow_to_spark_type,
    configure_session,
    conform,
    named_spark_errors,
    publish_outputs,
    reject_outputs,
    write_partition,
)
from features.tables import QUARANTINE_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SUITE = "raw_events"
PARQUET_MAGIC = b"PAR1"
DUPLICATE = "duplicate_event_id"
#: Every reason code the gate can give, in the order they are joined.
REASONS: tuple[str, ...] = (
    *(f"null_{c}" for c in REQUIRED_EVENT_COLUMNS),
    *(id_domain_reason(c) for c in ID_COLUMNS),
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
    checks += [F.when(F.col(c) < F.lit(MIN_ID), F.lit(id_domain_reason(c))) for c in ID_COLUMNS]  # int64: ≤ MAX_ID
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


def _is_parquet_file(path: Path) -> bool:
    """Whether ``path`` starts with the parquet magic bytes."""
    with path.open("rb") as fh:
        return fh.read(4) == PARQUET_MAGIC


def list_raw_files(path: Path) -> tuple[list[Path], list[str]]:
    """The data files of a raw partition, every one checked against the event contract.

    Spark skips names that start with ``_`` or ``.``; so does the gate, but never silently:
    such a file that holds parquet data is refused (its rows would be lost), and any other
    (``_SUCCESS``, ``.crc`` checksums) is returned by name so the report lists it.

    Args:
        path: the raw partition folder ``raw/events/ds=…``.

    Returns:
        ``(data files, ignored names)``, each sorted.

    Raises:
        FileNotFoundError: the partition has no data file.
        ContractError: a hidden file holds parquet data, the partition has a sub-folder, a file
            is not readable parquet, or a file's schema is not the event contract (the message
            names the file).
    """
    if not path.is_dir():
        raise FileNotFoundError(f"raw events partition not found: {path} (generate or import this day)")
    files: list[Path] = []
    ignored: list[str] = []
    for entry in sorted(path.iterdir()):
        hidden = entry.name.startswith(("_", "."))
        if entry.is_dir():
            if hidden:
                ignored.append(entry.name + "/")
                continue
            raise ContractError(f"{entry}: raw partitions hold parquet files only, not folders")
        if hidden:
            if _is_parquet_file(entry):
                raise ContractError(
                    f"{entry}: a parquet file whose name starts with '_' or '.' would be skipped by Spark and its "
                    "rows lost; rename it (or remove it if it is not data)"
                )
            ignored.append(entry.name)
            continue
        files.append(entry)
    if not files:
        raise FileNotFoundError(f"raw events partition has no data files: {path} (generate or import this day)")
    for f in files:
        check_event_file(f)
    if ignored:
        log.warning("raw partition %s: ignoring %d non-data entries %s", path, len(ignored), ignored)
    return files, ignored


def check_event_file(path: Path) -> None:
    """Raise ContractError naming ``path`` when it is not readable parquet or its schema is not the event contract.

    Reads the parquet footer only. Nanosecond timestamps are refused (Spark cannot read them).

    Args:
        path: one raw data file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(f"{path}: not a readable parquet file ({first})") from exc
    dtypes = []
    for field in schema:
        try:
            dtypes.append((field.name, arrow_to_spark_type(field.type).simpleString()))
        except TypeError:
            dtypes.append((field.name, str(field.type)))
        if field.name == "ts" and pa.types.is_timestamp(field.type) and field.type.unit == "ns":
            raise ContractError(
                f"{path}: column 'ts' holds nanosecond timestamps, which Spark cannot read; write microseconds"
            )
    check_event_schema(dtypes, str(path))


def _read_raw(spark: SparkSession, layout: Layout, ds: str) -> tuple[DataFrame, list[Path], list[str]]:
    from pyspark.sql import functions as F

    files, ignored = list_raw_files(Layout.partition(layout.raw_events, ds))
    raw = spark.read.parquet(*[str(f) for f in files])
    # timestamp_ntz is accepted by the contract and read as UTC (the session time zone)
    cols = [F.col(c).cast("timestamp").alias(c) if c == "ts" else F.col(c) for c in EVENT_COLUMNS]
    return raw.select(*cols), files, ignored


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
        FileNotFoundError: the raw partition is missing or has no data file.
        ContractError: a file of the raw partition is unreadable or its schema is not the event
            contract, or a hidden file holds data (the message names the file).
        GateError: no valid row, counts that do not reconcile, or the valid output fails GX
            (nothing is published; the run is kept under ``failed/ds=…/gate/``).
        SparkJobError: Spark could not read the data (one line, naming the file).
    """
    configure_session(spark)
    with named_spark_errors(f"gate ds={ds}"):
        raw, files, ignored = _read_raw(spark, layout, ds)
        tagged = tag_reasons(raw, ds).persist()
        try:
            return _gate(spark, layout, ds, tagged, {"files": len(files), "ignored_files": ignored})
        finally:
            tagged.unpersist()


def _reason_counts(tagged: DataFrame) -> tuple[int, int, int, dict[str, int]]:
    """``(rows_in, rows that will be valid, duplicated event ids, {reason: rows})`` in one Spark pass."""
    from pyspark.sql import functions as F

    stats = tagged.agg(
        F.count(F.lit(1)).alias("rows_in"),
        F.sum(F.when(F.col("reason") == "", 1).otherwise(0)).alias("valid"),
        F.sum(
            F.when(F.col("event_id").isNotNull() & (F.col("_copy") == 1) & (F.col("_copies") > 1), 1).otherwise(0)
        ).alias("dup_ids"),
        *[F.sum(F.array_contains(F.split("reason", ";"), r).cast("int")).alias(r) for r in REASONS],
    ).collect()[0]
    by_reason = {r: int(stats[r]) for r in sorted(REASONS) if stats[r]}
    return int(stats["rows_in"]), int(stats["valid"] or 0), int(stats["dup_ids"] or 0), by_reason


def _gx_on_raw(
    layout: Layout, ds: str, tagged: DataFrame, by_reason: dict[str, int], dup_ids: int
) -> tuple[dict[str, Any], dict[str, int], bool]:
    """Run GX's ``raw_events`` suite on the raw rows: ``(summary, unexpected per reason, agrees with the gate)``.

    Recorded, not required to pass: bad rows are what the gate is for.
    """
    raw_summary = quality.run_suite(
        tagged.select(*EVENT_COLUMNS), SUITE, quality.raw_events_expectations(ds), ds, layout=layout, label="raw"
    )
    gx_unexpected = quality.unexpected_by_reason(raw_summary)
    expected_from_gate = {r: by_reason.get(r, 0) for r in gx_unexpected}
    if DUPLICATE in expected_from_gate:
        expected_from_gate[DUPLICATE] += dup_ids  # GX counts the kept first copy of each duplicated id too
    agrees = expected_from_gate == gx_unexpected
    if not agrees:
        log.warning(
            "GX raw_events counts %s disagree with the gate's %s for ds=%s", gx_unexpected, expected_from_gate, ds
        )
    return raw_summary, gx_unexpected, agrees


def _gate(spark: SparkSession, layout: Layout, ds: str, tagged: DataFrame, inputs: dict[str, Any]) -> dict[str, Any]:
    from pyspark.sql import functions as F

    valid_out = StagedPartition.beside(Layout.partition(layout.valid_events, ds))
    quarantine_out = StagedPartition.beside(Layout.partition(layout.quarantine_events, ds))
    outputs = [valid_out, quarantine_out]

    rows_in, rows_valid_expected, dup_ids, by_reason = _reason_counts(tagged)
    bad = tagged.where(F.col("reason") != "")
    good = tagged.where(F.col("reason") == "")
    raw_summary, gx_unexpected, gx_agrees = _gx_on_raw(layout, ds, tagged, by_reason, dup_ids)

    order = ["ts", "event_id", "_file", "_pos"]
    conform(bad, QUARANTINE_SCHEMA, str(quarantine_out.final))
    write_partition(bad, quarantine_out.staged, order, columns=QUARANTINE_SCHEMA.names)
    rows_quarantined = spark.read.parquet(str(quarantine_out.staged)).count()

    result: dict[str, Any] = {
        "step": "gate",
        "ds": ds,
        **inputs,
        "rows_in": rows_in,
        "rows_quarantined": rows_quarantined,
        "by_reason": by_reason,
        "duplicated_event_ids": dup_ids,
        "gx": {f"{SUITE}:raw": raw_summary["success"]},
        "gx_unexpected_raw": gx_unexpected,
        "gx_agrees": gx_agrees,
        "valid_path": str(valid_out.final),
        "quarantine_path": str(quarantine_out.final),
        "gx_results": [raw_summary],
    }

    if rows_valid_expected == 0:
        result["rows_valid"] = 0
        where = reject_outputs(layout, ds, "gate", result, outputs)
        raise GateError(
            f"gate ds={ds}: no valid rows among {rows_in} raw events (reasons {by_reason}); nothing published, "
            f"earlier outputs of ds={ds} are unchanged; the quarantined rows are kept in {where}"
        )

    write_partition(good, valid_out.staged, order, columns=list(EVENT_COLUMNS))
    valid = spark.read.parquet(str(valid_out.staged)).persist()
    try:
        rows_valid = valid.count()
        result["rows_valid"] = rows_valid
        if rows_in != rows_valid + rows_quarantined:
            where = reject_outputs(layout, ds, "gate", result, outputs)
            raise GateError(
                f"gate ds={ds}: counts do not reconcile: rows_in {rows_in} != valid {rows_valid} + quarantined "
                f"{rows_quarantined}; nothing published, the rejected run is kept in {where}"
            )
        valid_summary = quality.validate_output(
            valid, SUITE, quality.raw_events_expectations(ds), ds, layout=layout, label="valid"
        )
    finally:
        valid.unpersist()
    result["gx"][f"{SUITE}:valid"] = valid_summary["success"]
    result["gx_results"].append(valid_summary)
    if not valid_summary["success"]:
        where = reject_outputs(layout, ds, "gate", result, outputs)
        try:
            quality.require_success(valid_summary, str(valid_out.final))
        except quality.QualityError as exc:
            raise GateError(
                f"gate ds={ds} failed: {exc}; nothing published, the rejected run is kept in {where}"
            ) from exc

    publish_outputs(layout, ds, "gate", result, outputs)
    return result


__all__ = ["ContractError", "GateError", "run_gate", "tag_reasons"]
