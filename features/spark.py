"""Spark plumbing shared by the feature jobs: the session, table schemas, partition I/O, reports.

Every job takes a ``SparkSession`` and a :class:`~features.config.Layout`; the session
comes from :func:`spark_session`, which runs Spark in UTC (the event contract is UTC)
and writes parquet timestamps as microseconds, so pyarrow/pandas readers see
``timestamp[us, tz=UTC]`` exactly like the schemas in :mod:`features.tables`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from features.config import Layout
from features.contract import ContractError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"

#: Session-level SQL settings every job relies on (also applied to a reused session).
SESSION_SQL_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def configure_session(spark: SparkSession) -> None:
    """Apply the runtime SQL settings the jobs rely on (UTC, microsecond parquet timestamps).

    Args:
        spark: the session to configure (new or reused).
    """
    for key, value in SESSION_SQL_CONF.items():
        spark.conf.set(key, value)


def _active_session() -> SparkSession | None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    default = getattr(SparkSession, "_instantiatedSession", None)
    if default is not None and default.sparkContext._jsc is not None:
        return default
    return None


def require_java() -> None:
    """Raise one clear sentence when no Java runtime is there for Spark (instead of a gateway crash)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return
    if shutil.which("java") is None:
        raise RuntimeError(
            "Spark needs Java 17: no 'java' on PATH and no JAVA_HOME "
            "(install OpenJDK 17, e.g. 'apt-get install openjdk-17-jre-headless')."
        )


@contextmanager
def spark_session(master: str | None = None, keep_alive: bool = False) -> Iterator[SparkSession]:
    """A SparkSession for the feature jobs, stopped on exit only if this call created it.

    Args:
        master: Spark master URL; default ``$AFM_SPARK_MASTER`` or ``local[*]``. Ignored when
            a session is already active in this process (it is reused, and left running).
        keep_alive: leave a session this call created running until the process exits, so
            the next step in the same process (Airflow tasks under ``dags test``) reuses it.

    Yields:
        The session, with UTC session time zone and small shuffle partitions.
    """
    existing = _active_session()
    if existing is not None:
        configure_session(existing)
        yield existing
        return

    from pyspark.sql import SparkSession

    require_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    url = master or os.environ.get("AFM_SPARK_MASTER") or DEFAULT_MASTER
    shuffle = os.environ.get("AFM_SPARK_SHUFFLE_PARTITIONS", "4" if url.startswith("local") else "200")
    builder = (
        SparkSession.builder.master(url)
        .appName("activityfm-features")
        .config("spark.sql.shuffle.partitions", shuffle)
        .config("spark.default.parallelism", shuffle)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
        .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
    )
    for key, value in SESSION_SQL_CONF.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    configure_session(spark)
    log.info("started Spark %s (master %s, shuffle partitions %s)", spark.version, url, shuffle)
    if keep_alive:
        atexit.register(spark.stop)
        yield spark
        return
    try:
        yield spark
    finally:
        spark.stop()


# ------------------------------------------------------------------------- schemas
def arrow_to_spark_type(arrow_type: pa.DataType) -> DataType:
    """The Spark SQL type that holds values of a pyarrow type (as the tables use them).

    Args:
        arrow_type: a pyarrow type from one of the ``features.tables`` schemas.
    """
    from pyspark.sql import types as T

    if pa.types.is_int64(arrow_type):
        return T.LongType()
    if pa.types.is_int32(arrow_type):
        return T.IntegerType()
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return T.StringType()
    if pa.types.is_timestamp(arrow_type):
        return T.TimestampType() if arrow_type.tz else T.TimestampNTZType()
    if pa.types.is_float32(arrow_type):
        return T.FloatType()
    if pa.types.is_float64(arrow_type):
        return T.DoubleType()
    if pa.types.is_boolean(arrow_type):
        return T.BooleanType()
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return T.ArrayType(arrow_to_spark_type(arrow_type.value_type))
    raise TypeError(f"no Spark type mapping for arrow type {arrow_type}")


def spark_schema(schema: pa.Schema) -> StructType:
    """The Spark ``StructType`` of a pyarrow table schema.

    Args:
        schema: one of the ``features.tables`` / ``features.contract`` schemas.
    """
    from pyspark.sql import types as T

    return T.StructType([T.StructField(f.name, arrow_to_spark_type(f.type), f.nullable) for f in schema])


def conform(df: DataFrame, schema: pa.Schema, where: str) -> DataFrame:
    """Select and order ``df``'s columns as ``schema`` says, raising if a column is missing or mistyped.

    Args:
        df: the frame a job is about to write.
        schema: the table contract (``features.tables.*_SCHEMA``).
        where: what is being written (used in the error message).

    Returns:
        ``df`` restricted to the schema's columns, in the schema's order.
    """
    want = spark_schema(schema)
    have = {f.name: f.dataType for f in df.schema.fields}
    missing = [f.name for f in want.fields if f.name not in have]
    wrong = [
        f"{f.name}: {have[f.name].simpleString()} (expected {f.dataType.simpleString()})"
        for f in want.fields
        if f.name in have and have[f.name] != f.dataType
    ]
    if missing or wrong:
        raise ContractError(f"{where}: output does not match its table schema: missing {missing}, wrong types {wrong}")
    return df.select(*[f.name for f in want.fields])


# ----------------------------------------------------------------------------- I/O
def has_parquet(path: Path) -> bool:
    """Whether ``path`` is a directory holding at least one parquet file.

    Args:
        path: a partition directory.
    """
    return path.is_dir() and any(p.suffix == ".parquet" for p in path.rglob("*.parquet"))


def read_partition(spark: SparkSession, path: Path, what: str, hint: str = "") -> DataFrame:
    """Read one parquet partition, with an error that names the path when it is missing.

    Args:
        spark: the session.
        path: the partition directory (``…/ds=YYYY-MM-DD``).
        what: a name for the table in the error message.
        hint: what to run to create it (appended to the error message).
    """
    if not has_parquet(path):
        raise FileNotFoundError(f"{what} partition not found: {path} has no parquet files{'; ' + hint if hint else ''}")
    return spark.read.parquet(str(path))


def write_partition(df: DataFrame, path: Path, order_by: list[str], columns: list[str] | None = None) -> None:
    """Overwrite one partition with ``df`` as a single parquet file, rows sorted by ``order_by``.

    Sorting and one file make a rerun give the same rows in the same order.

    Args:
        df: rows to write.
        path: the partition directory; replaced as a whole.
        order_by: column names that order the rows deterministically (may include helper columns).
        columns: the columns to write, in order (default: all of ``df``'s); selected after sorting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.repartition(1).sortWithinPartitions(*order_by)
    if columns is not None:
        out = out.select(*columns)
    out.write.mode("overwrite").parquet(str(path))


def remove_partition(path: Path) -> None:
    """Delete a partition directory if present (used when an output fails its checks).

    Args:
        path: the partition directory.
    """
    if path.exists():
        shutil.rmtree(path)


def write_report(layout: Layout, ds: str, step: str, result: dict[str, Any]) -> Path:
    """Write a step's result as ``reports/ds=DS/<step>.json`` and log a one-line summary.

    Args:
        layout: the data root.
        ds: partition day.
        step: step name (file name without ``.json``).
        result: JSON-serialisable result (datetimes are written as strings).

    Returns:
        The report path.
    """
    out = Layout.partition(layout.reports, ds) / f"{step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    flat = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool) and k not in ("ds", "step")}
    line = " ".join(f"{k}={v}" for k, v in sorted(flat.items()))
    log.info("[%s ds=%s] %s", step, ds, line)
    return out


def finish_step(
    layout: Layout,
    ds: str,
    step: str,
    result: dict[str, Any],
    outputs: list[tuple[dict[str, Any], Path]],
    failure: str | None = None,
) -> dict[str, Any]:
    """Record a step's report; if an output's GX suite failed (or ``failure`` says why), reject its outputs.

    A rejected step removes every output partition it wrote and raises, so nothing
    downstream reads data that failed its checks; the report stays, with ``status: failed``.

    Args:
        layout: the data root.
        ds: partition day.
        step: step name (report file name).
        result: the step's result; ``status`` is set here.
        outputs: ``(GX summary, partition path)`` of every output the step wrote.
        failure: a non-GX reason the step failed (None when there is none).

    Returns:
        ``result`` when every check passed.
    """
    from features import quality

    ok = failure is None and all(summary["success"] for summary, _ in outputs)
    result["status"] = "ok" if ok else "failed"
    write_report(layout, ds, step, result)
    if ok:
        return result
    for _, path in outputs:
        remove_partition(path)
    for summary, path in outputs:
        quality.require_success(summary, str(path))
    raise quality.QualityError(f"{step} ds={ds}: {failure}")
