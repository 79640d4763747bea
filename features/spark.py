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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from features.config import Layout
from features.contract import ContractError
from features.reproducible import canonicalize_spark_parquet

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


def is_local_master(url: str) -> bool:
    """True for ``local``, ``local[N]`` and ``local[*]``: the executors run inside the driver's JVM.

    Args:
        url: a Spark master URL.
    """
    return url == "local" or url.startswith("local[")


def cluster_conf(url: str) -> dict[str, str]:
    """Settings a session on a cluster master needs beyond :data:`SESSION_SQL_CONF` (none for local masters).

    * ``spark.executor.memory``: ``$AFM_SPARK_EXECUTOR_MEMORY``, default ``768m``: an executor
      fits a worker that offers 1g (``afm spark up``), with room left for the JVM's own memory.
    * on a master at ``127.0.0.1``/``localhost`` (the one-machine cluster), the driver listens on
      ``127.0.0.1`` too, where the executors look for it (not on the host name's address).

    Args:
        url: the Spark master URL.
    """
    if is_local_master(url):
        return {}
    conf = {"spark.executor.memory": os.environ.get("AFM_SPARK_EXECUTOR_MEMORY", "768m")}
    host = url.split("://", 1)[-1].split(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        conf.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"})
    return conf


@contextmanager
def spark_session(master: str | None = None, keep_alive: bool = False) -> Iterator[SparkSession]:
    """A SparkSession for the feature jobs, stopped on exit only if this call created it.

    Args:
        master: Spark master URL; default ``$AFM_SPARK_MASTER`` or ``local[*]``. Ignored when
            a session is already active in this process (it is reused, and left running).
        keep_alive: leave a session this call created running until the process exits, so
            the next step in the same process (Airflow tasks under ``dags test``) reuses it.

    Yields:
        The session, with UTC session time zone and small shuffle partitions. On a cluster master
        (not ``local…``) the project's code is shipped to the executors
        (:func:`features.shipping.ship_project_code`) and :func:`cluster_conf` applies.
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
    # launched by spark-submit (the Spark Operator's driver pod): its --master and conf hold, the
    # image already carries the code, so nothing is set over them unless a master is named here
    submitted = master is None and not os.environ.get("AFM_SPARK_MASTER") and "PYSPARK_GATEWAY_PORT" in os.environ
    url = master or os.environ.get("AFM_SPARK_MASTER") or DEFAULT_MASTER
    shuffle = os.environ.get("AFM_SPARK_SHUFFLE_PARTITIONS", "4" if is_local_master(url) and not submitted else "200")
    builder = SparkSession.builder if submitted else SparkSession.builder.master(url)
    builder = (
        builder.appName("activityfm-features")
        .config("spark.sql.shuffle.partitions", shuffle)
        .config("spark.default.parallelism", shuffle)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])  # the executors' Python: this one by default
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
        .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
    )
    for key, value in {**SESSION_SQL_CONF, **({} if submitted else cluster_conf(url))}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    configure_session(spark)
    shipped = ""
    if submitted:
        url = spark.sparkContext.master
    elif not is_local_master(url):
        from features.shipping import ship_project_code

        shipped = f", code shipped as {ship_project_code(spark).name}"
    log.info("started Spark %s (master %s, shuffle partitions %s%s)", spark.version, url, shuffle, shipped)
    if keep_alive:
        atexit.register(spark.stop)
        yield spark
        return
    try:
        yield spark
    finally:
        spark.stop()


class SparkJobError(RuntimeError):
    """A Spark job failed; the message is the first line of Spark's error (it names the file it could not read)."""


def is_spark_error(exc: BaseException) -> bool:
    try:
        from py4j.protocol import Py4JJavaError
        from pyspark.errors import PySparkException
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return False
    return isinstance(exc, Py4JJavaError | PySparkException)


def spark_error_line(exc: BaseException) -> str:
    """The first meaningful line of a Spark/JVM error, without the Java stack trace.

    Args:
        exc: an exception raised by a Spark action.
    """
    try:
        from py4j.protocol import Py4JJavaError

        if isinstance(exc, Py4JJavaError):
            text = str(exc.java_exception.toString())
        else:
            text = str(exc)
    except Exception:  # noqa: BLE001 - the JVM may be gone: fall back to the Python text
        text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("at ")]
    return lines[0] if lines else type(exc).__name__


def spark_failure(exc: BaseException) -> str:
    """``Spark failed: <first line of Spark's error>``: how a Spark failure reads in one line."""
    return f"Spark failed: {spark_error_line(exc)}"


@contextmanager
def named_spark_errors(what: str) -> Iterator[None]:
    """Turn a Spark/JVM failure inside the block into one :class:`SparkJobError` line prefixed with ``what``.

    Errors the project raises itself pass through unchanged.

    Args:
        what: the job and day, e.g. ``"gate ds=2026-01-05"``.
    """
    try:
        yield
    except Exception as exc:
        if is_spark_error(exc):
            raise SparkJobError(f"{what}: {spark_failure(exc)}") from exc
        raise


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
    """Overwrite the folder ``path`` with ``df`` as a single parquet file, rows sorted by ``order_by``.

    Sorting and one file make a rerun give the same rows in the same order. Jobs write into
    a :class:`StagedPartition`'s ``staged`` folder, never straight into a published partition.

    Args:
        df: rows to write.
        path: the folder to write; replaced as a whole.
        order_by: column names that order the rows deterministically (may include helper columns).
        columns: the columns to write, in order (default: all of ``df``'s); selected after sorting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.repartition(1).sortWithinPartitions(*order_by)
    if columns is not None:
        out = out.select(*columns)
    out.write.mode("overwrite").parquet(str(path))


def remove_partition(path: Path) -> None:
    """Delete a partition directory if present.

    Args:
        path: the partition directory.
    """
    if path.exists():
        shutil.rmtree(path)


def replace_dir(new: Path, final: Path) -> None:
    """Swap the folder ``new`` into place as ``final``; the old ``final`` (if any) is removed after the swap.

    The old folder is first renamed aside (``.<name>.old-<id>``), so a crash between the two
    renames leaves it on disk, and :meth:`StagedPartition.beside` puts it back on the next run.

    Args:
        new: the fully written folder.
        final: where it is published.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


@dataclass(frozen=True)
class StagedPartition:
    """An output written aside (``staged``) and published as ``final`` only when its step succeeds.

    A failed or crashed run therefore leaves the previously published ``final`` exactly as it
    was. The staging folder's name starts with ``.``, which Spark and pyarrow skip when they
    read the table folder above it.

    Args:
        final: the published partition folder.
        staged: the folder the job writes (see :meth:`beside`).

    Example::

        out = StagedPartition.beside(Layout.partition(layout.user_sequences, ds))
        write_partition(df, out.staged, ["user_id"])
        ...  # checks read out.staged
        out.publish()
    """

    final: Path
    staged: Path

    @classmethod
    def beside(cls, final: Path) -> StagedPartition:
        """A fresh staging folder next to ``final`` (what a crashed run left behind is cleared first)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():  # a crash between replace_dir's two renames: the old output is put back
            aside = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
            if aside:
                aside[-1].rename(final)
                log.warning("restored %s from %s (left by an interrupted swap)", final, aside[-1].name)
        staged = final.with_name(f".{final.name}.staging")
        remove_partition(staged)
        return cls(final, staged)

    def publish(self) -> None:
        """Swap the staged output in as ``final``, its Spark part files made byte-reproducible first.

        (:func:`features.reproducible.canonicalize_spark_parquet`: no job uuid in the file names,
        sorted encodings lists in the footers; the same rows give the same bytes on any master.)
        """
        if self.staged.is_dir():
            canonicalize_spark_parquet(self.staged)
        replace_dir(self.staged, self.final)

    def set_aside(self, folder: Path) -> Path:
        """Move the staged output (if written) to ``folder`` for inspection; ``final`` is untouched.

        Returns:
            ``folder``.
        """
        remove_partition(folder)
        if self.staged.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            self.staged.rename(folder)
        return folder


def failed_run_dir(layout: Layout, ds: str, step: str) -> Path:
    """Where a failed run of ``step`` for ``ds`` keeps its report and rejected outputs: ``failed/ds=…/<step>/``."""
    return Layout.partition(layout.failed, ds) / step


def publish_outputs(layout: Layout, ds: str, step: str, result: dict[str, Any], outputs: list[StagedPartition]) -> None:
    """Publish every staged output of a successful step, then its report (``status: ok``).

    A report of an earlier failed run of the same step and day is removed.

    Args:
        layout: the data root.
        ds: partition day.
        step: step name.
        result: the step's result (``status`` is set here).
        outputs: the step's staged outputs.
    """
    result["status"] = "ok"
    for out in outputs:
        out.publish()
    write_report(layout, ds, step, result)
    remove_partition(failed_run_dir(layout, ds, step))


def reject_outputs(layout: Layout, ds: str, step: str, result: dict[str, Any], outputs: list[StagedPartition]) -> Path:
    """Keep a failed step's staged outputs and report under ``failed/ds=…/<step>/``; published data is untouched.

    Each output goes to ``failed/ds=…/<step>/<table path under the data root>``, the report to
    ``failed/ds=…/<step>/<step>.json`` (``status: failed``). The previous successful run's
    outputs and report stay exactly as they were.

    Args:
        layout: the data root.
        ds: partition day.
        step: step name.
        result: the step's result (``status`` is set here).
        outputs: the step's staged outputs.

    Returns:
        The folder that holds the failed run.
    """
    result["status"] = "failed"
    where = failed_run_dir(layout, ds, step)
    remove_partition(where)
    for out in outputs:
        try:
            table = out.final.parent.relative_to(layout.root)
        except ValueError:
            table = Path(out.final.parent.name)
        out.set_aside(where / table)
    write_report(layout, ds, step, result, path=where / f"{step}.json")
    return where


def write_report(layout: Layout, ds: str, step: str, result: dict[str, Any], path: Path | None = None) -> Path:
    """Write a step's result as ``reports/ds=DS/<step>.json`` (or ``path``) and log a one-line summary.

    Args:
        layout: the data root.
        ds: partition day.
        step: step name (file name without ``.json``).
        result: JSON-serialisable result (datetimes are written as strings).
        path: where to write instead (a failed run's report, see :func:`reject_outputs`).

    Returns:
        The report path.
    """
    out = path or Layout.partition(layout.reports, ds) / f"{step}.json"
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
    outputs: list[tuple[dict[str, Any], StagedPartition]],
    failure: str | None = None,
) -> dict[str, Any]:
    """Publish a step's staged outputs when every GX suite passed; otherwise set them aside and raise.

    A rejected step publishes nothing: the previous run's outputs and report stay as they
    were, and the rejected outputs and a ``status: failed`` report are kept under
    ``failed/ds=…/<step>/`` (see :func:`reject_outputs`).

    Args:
        layout: the data root.
        ds: partition day.
        step: step name (report file name).
        result: the step's result; ``status`` is set here.
        outputs: ``(GX summary, staged output)`` of every output the step wrote.
        failure: a non-GX reason the step failed (None when there is none).

    Returns:
        ``result`` when every check passed.

    Raises:
        quality.QualityError: a suite failed or ``failure`` was given; the message names the
            failed expectations and the folder that keeps the rejected run.
    """
    from features import quality

    staged = [out for _, out in outputs]
    if failure is None and all(summary["success"] for summary, _ in outputs):
        publish_outputs(layout, ds, step, result, staged)
        return result
    where = reject_outputs(layout, ds, step, result, staged)
    for summary, out in outputs:
        try:
            quality.require_success(summary, str(out.final))
        except quality.QualityError as exc:
            raise quality.QualityError(f"{exc} (nothing published; the rejected run is kept in {where})") from exc
    raise quality.QualityError(f"{step} ds={ds}: {failure} (nothing published; the rejected run is kept in {where})")
