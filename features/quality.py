"""Great Expectations (GX 1.x) data-quality suites for raw events and every feature table.

All GX calls live here. One file-backed GX project per data root (``layout.gx``) holds
the suites, validation definitions, checkpoints, results and the data docs site; the
context is created once per process and reused (GX is slow to start).

Each run goes through a Checkpoint on a Spark dataframe data source (whole-dataframe
batch definition, ``batch_parameters={"dataframe": df}``); the results are stored in the
project and the data docs under ``layout.gx`` are rebuilt once per day (``build_data_docs``).

Suites:

- ``raw_events``: the contract's columns, required columns not null, ids in the id
  domain ``[MIN_ID, MAX_ID]``, ``action`` in
  ACTIONS, ``surface`` in SURFACES, ``ts`` inside the partition's day, unique
  ``event_id``. Run on the raw partition (its unexpected counts are recorded next to
  the gate's quarantine counts) and on the valid output (which must pass).
- ``user_sequences``: ``user_id`` unique and not null, sequence arrays not null, aligned,
  1..max_len long, ``n_events`` ≥ sequence length.
- ``request_sequences``: ``request_id`` unique and not null, point-in-time (no sequence
  event at or after the request time), at most max_len long.
- ``ranking_examples``: keys not null, (request_id, item_id) unique, labels in {0, 1}.
- ``pretrain_corpus``: keys not null, (user_id, segment) unique, 2..segment_len events.

Derived check columns (``seq_len``, ``aligned``, ``point_in_time``) are added by the
``*_view`` helpers to the frame that is validated, never to the stored table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from features.config import Layout, day_window
from features.contract import (
    ACTIONS,
    EVENT_COLUMNS,
    ID_COLUMNS,
    LABEL_ACTIONS,
    MAX_ID,
    MIN_ID,
    REQUIRED_EVENT_COLUMNS,
    SURFACES,
    id_domain_reason,
)

if TYPE_CHECKING:
    from great_expectations.data_context import FileDataContext
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

DATASOURCE_NAME = "activityfm_spark"
BATCH_DEFINITION_NAME = "whole_dataframe"

#: Which gate reason code each raw_events expectation counts, keyed by (expectation type, column).
RAW_EXPECTATION_REASONS: dict[tuple[str, str | None], str] = {
    **{("expect_column_values_to_not_be_null", c): f"null_{c}" for c in REQUIRED_EVENT_COLUMNS},
    **{("expect_column_values_to_be_between", c): id_domain_reason(c) for c in ID_COLUMNS},
    ("expect_column_values_to_be_in_set", "action"): "unknown_action",
    ("expect_column_values_to_be_in_set", "surface"): "unknown_surface",
    ("expect_column_values_to_be_between", "ts"): "ts_out_of_day",
    ("expect_column_values_to_be_unique", "event_id"): "duplicate_event_id",
}

_CONTEXTS: dict[Path, FileDataContext] = {}


class QualityError(RuntimeError):
    """A data-quality suite that must pass did not; the message lists the failed expectations."""


def _gx() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


@contextlib.contextmanager
def project_lock(layout: Layout) -> Iterator[None]:
    """One process at a time in the GX project of a data root.

    The project is files (suites, validation definitions, checkpoints, results). Tasks of
    parallel DAG runs (a backfill runs several days at once) would otherwise update a suite
    while another run validates with it, and GX refuses that run ("ExpectationSuite … has
    changed since it has last been saved").
    """
    root = Path(layout.gx)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".afm-project.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get_context(layout: Layout) -> FileDataContext:
    """The file-backed GX context of this data root (created under ``layout.gx`` on first use, then cached).

    Args:
        layout: the data root; the GX project lives in ``layout.gx``.
    """
    root = Path(layout.gx).resolve()
    ctx = _CONTEXTS.get(root)
    if ctx is not None:
        return ctx
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", context_root_dir=str(root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.variables.save()
    ctx.data_sources.add_or_update_spark(name=DATASOURCE_NAME)
    _CONTEXTS[root] = ctx
    log.info("Great Expectations %s context at %s", gx.__version__, root)
    return ctx


def _batch_definition(ctx: FileDataContext, asset_name: str) -> Any:
    source = ctx.data_sources.get(DATASOURCE_NAME)
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(name=asset_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION_NAME)
    except (KeyError, LookupError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)


def _summarise(result: Any, suite_name: str, label: str, ds: str) -> dict[str, Any]:
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = cfg.kwargs
        column = kwargs.get("column") or (",".join(kwargs["column_list"]) if kwargs.get("column_list") else None)
        exc = (
            (r.exception_info or {}).get("exception_message")
            if (r.exception_info or {}).get("raised_exception")
            else None
        )
        res = r.result or {}
        rows.append(
            {
                "expectation": cfg.type,
                "column": column,
                "success": bool(r.success),
                "unexpected_count": res.get("unexpected_count"),
                "element_count": res.get("element_count"),
                **({"observed_value": res["observed_value"]} if "observed_value" in res else {}),
                **({"exception": exc} if exc else {}),
            }
        )
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    return {
        "suite": suite_name,
        "label": label,
        "ds": ds,
        "success": bool(result.success),
        "evaluated": len(rows),
        "failed": [f"{x['expectation']}({x.get('column') or ''})" for x in rows if not x["success"]],
        "results": rows,
    }


def run_suite(
    spark_df: DataFrame,
    suite_name: str,
    expectations: list[Any],
    ds: str,
    *,
    layout: Layout | None = None,
    label: str = "output",
    result_format: str = "BASIC",
) -> dict[str, Any]:
    """Validate a Spark dataframe with a suite through a GX Checkpoint (which also updates the data docs).

    Args:
        spark_df: the data to validate (small derived check columns may be added by the ``*_view`` helpers).
        suite_name: name of the expectation suite (created or updated with ``expectations``).
        expectations: GX expectation objects (``great_expectations.expectations``), built fresh per call.
        ds: the partition day validated (recorded in the run name).
        layout: data root whose GX project is used (default: ``Layout.default()``).
        label: which data the suite ran on (e.g. ``raw``/``valid``); one validation definition per (suite, label).
        result_format: GX result format; ``BASIC`` returns unexpected counts, ``BOOLEAN_ONLY`` is faster
            (fewer Spark jobs) and returns only success flags.

    Returns:
        ``{"suite", "label", "ds", "success", "evaluated", "failed": [...], "results": [{expectation, column,
        success, unexpected_count, element_count, ...}]}``.
    """
    layout = layout or Layout.default()
    with project_lock(layout):
        return _run_suite(spark_df, suite_name, expectations, ds, layout, label, result_format)


def _run_suite(
    spark_df: DataFrame, suite_name: str, expectations: list[Any], ds: str, layout: Layout, label: str,
    result_format: str,
) -> dict[str, Any]:  # fmt: skip
    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier

    ctx = get_context(layout)
    suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    name = f"{suite_name}__{label}"
    vd = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=_batch_definition(ctx, suite_name), suite=suite)
    )
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=name,
            validation_definitions=[vd],
            # data docs are rebuilt once per day by build_data_docs (the `data_docs` DAG task and
            # run_day), not after every suite: rendering them costs ~1 s a suite
            actions=[],
            result_format={"result_format": result_format},
        )
    )
    run_id = RunIdentifier(run_name=f"{name}__ds={ds}", run_time=dt.datetime.now(dt.UTC))
    cp_result = checkpoint.run(batch_parameters={"dataframe": spark_df}, run_id=run_id)
    (validation,) = cp_result.run_results.values()
    summary = _summarise(validation, suite_name, label, ds)
    log.info(
        "GX %s on %s (ds=%s): %s, %d expectations%s",
        suite_name,
        label,
        ds,
        "passed" if summary["success"] else "FAILED",
        summary["evaluated"],
        f", failed {summary['failed']}" if summary["failed"] else "",
    )
    return summary


def validate_output(
    spark_df: DataFrame, suite_name: str, expectations: list[Any], ds: str, *, layout: Layout, label: str = "output"
) -> dict[str, Any]:
    """Run an output suite cheaply (success flags only); when it fails, rerun it for unexpected counts.

    Args:
        spark_df: the written output (read back), with any derived check columns.
        suite_name: suite name.
        expectations: GX expectations (a fresh list; it is rebuilt for the detailed rerun by copying).
        ds: partition day.
        layout: data root.
        label: which data the suite ran on.

    Returns:
        A :func:`run_suite` summary (with counts when the suite failed).
    """
    detailed = [e.copy(deep=True) for e in expectations]
    summary = run_suite(
        spark_df, suite_name, expectations, ds, layout=layout, label=label, result_format="BOOLEAN_ONLY"
    )
    if summary["success"]:
        return summary
    return run_suite(spark_df, suite_name, detailed, ds, layout=layout, label=label, result_format="BASIC")


def require_success(summary: dict[str, Any], where: str) -> None:
    """Raise :class:`QualityError` naming the failed expectations when a suite did not pass.

    Args:
        summary: a :func:`run_suite` result.
        where: what was validated (e.g. the output path), for the message.
    """
    if summary["success"]:
        return
    details = [
        f"{r['expectation']}({r.get('column') or ''}): unexpected {r.get('unexpected_count')}"
        + (f", error {r['exception']}" if r.get("exception") else "")
        for r in summary["results"]
        if not r["success"]
    ]
    raise QualityError(f"GX suite {summary['suite']!r} failed on {where}: " + "; ".join(details))


def unexpected_by_reason(summary: dict[str, Any]) -> dict[str, int]:
    """Unexpected-row counts of a ``raw_events`` run, keyed by the gate's reason codes.

    Args:
        summary: a :func:`run_suite` result of the ``raw_events`` suite.
    """
    out: dict[str, int] = {}
    for r in summary["results"]:
        reason = RAW_EXPECTATION_REASONS.get((r["expectation"], r.get("column")))
        if reason is not None:
            out[reason] = int(r.get("unexpected_count") or 0)
    return out


def build_data_docs(layout: Layout) -> str:
    """Rebuild the GX data docs site and return the path of its ``index.html``.

    Args:
        layout: the data root whose GX project is used.
    """
    with project_lock(layout):
        urls = get_context(layout).build_data_docs()
    url = next(iter(urls.values()))
    path = unquote(urlparse(url).path) if url.startswith("file:") else url
    return str(Path(path))


def data_docs_index(layout: Layout) -> Path:
    """Where the local data docs site's ``index.html`` is (built by every job's checkpoint).

    Args:
        layout: the data root whose GX project is used.
    """
    return layout.gx / "uncommitted" / "data_docs" / "local_site" / "index.html"


# --------------------------------------------------------------------------- suites
def raw_events_expectations(ds: str) -> list[Any]:
    """The ``raw_events`` suite for day ``ds`` (the event contract as GX expectations).

    Args:
        ds: partition day; ``ts`` must lie in ``[ds 00:00, ds+1 00:00)`` UTC.
    """
    gxe = _gx().expectations
    start, end = day_window(ds)
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(EVENT_COLUMNS), exact_match=True),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_EVENT_COLUMNS],
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=MIN_ID, max_value=MAX_ID) for c in ID_COLUMNS],
        gxe.ExpectColumnValuesToBeInSet(column="action", value_set=list(ACTIONS)),
        gxe.ExpectColumnValuesToBeInSet(column="surface", value_set=list(SURFACES)),
        gxe.ExpectColumnValuesToBeBetween(column="ts", min_value=start, max_value=end, strict_max=True),
        gxe.ExpectColumnValuesToBeUnique(column="event_id"),
    ]


def _sequence_checks(max_len: int, min_len: int) -> list[Any]:
    gxe = _gx().expectations
    return [
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("item_ids", "actions", "surfaces", "ts")],
        gxe.ExpectColumnValuesToBeInSet(column="aligned", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="seq_len", min_value=min_len, max_value=max_len),
    ]


def user_sequences_expectations(max_len: int) -> list[Any]:
    """The ``user_sequences`` suite (validate :func:`sequence_view` of the snapshot).

    Args:
        max_len: the cap on the stored sequence length.
    """
    gxe = _gx().expectations
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        *_sequence_checks(max_len, 1),
        gxe.ExpectColumnValuesToNotBeNull(column="last_ts"),
        gxe.ExpectColumnValuesToBeInSet(column="n_events_covers_sequence", value_set=[True]),
    ]


def request_sequences_expectations(max_len: int) -> list[Any]:
    """The ``request_sequences`` suite (validate :func:`request_sequence_view`).

    Args:
        max_len: the cap on the stored sequence length.
    """
    gxe = _gx().expectations
    return [
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("request_id", "user_id", "request_ts", "surface")],
        gxe.ExpectColumnValuesToBeUnique(column="request_id"),
        *_sequence_checks(max_len, 0),
        gxe.ExpectColumnValuesToBeInSet(column="point_in_time", value_set=[True]),
    ]


def ranking_examples_expectations() -> list[Any]:
    """The ``ranking_examples`` suite: keys not null, one row per (request, item), 0/1 labels."""
    gxe = _gx().expectations
    return [
        *[
            gxe.ExpectColumnValuesToNotBeNull(column=c)
            for c in ("request_id", "user_id", "item_id", "surface", "impression_ts")
        ],
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["request_id", "item_id"]),
        *[gxe.ExpectColumnValuesToBeInSet(column=f"label_{a}", value_set=[0, 1]) for a in LABEL_ACTIONS],
        *[gxe.ExpectColumnValuesToNotBeNull(column=f"label_{a}") for a in LABEL_ACTIONS],
    ]


def pretrain_corpus_expectations(segment_len: int) -> list[Any]:
    """The ``pretrain_corpus`` suite (validate :func:`sequence_view` of the corpus).

    Args:
        segment_len: the maximum segment length.
    """
    gxe = _gx().expectations
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="segment"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "segment"]),
        *_sequence_checks(segment_len, 2),
    ]


# ---------------------------------------------------------------------------- views
def sequence_view(df: DataFrame) -> DataFrame:
    """Add the derived check columns ``seq_len`` and ``aligned`` (all sequence arrays equally long).

    For a user_sequences frame also ``n_events_covers_sequence`` (``n_events`` ≥ ``seq_len``).

    Args:
        df: a frame with the ``features.tables.SEQUENCE_FIELDS`` array columns.
    """
    from pyspark.sql import functions as F

    n = F.size("item_ids")
    out = df.withColumn("seq_len", n).withColumn(
        "aligned", (F.size("actions") == n) & (F.size("surfaces") == n) & (F.size("ts") == n)
    )
    if "n_events" in df.columns:
        out = out.withColumn("n_events_covers_sequence", F.coalesce(F.col("n_events") >= n, F.lit(False)))
    return out


def request_sequence_view(df: DataFrame) -> DataFrame:
    """:func:`sequence_view` plus ``point_in_time``: every sequence ``ts`` is strictly before ``request_ts``.

    Args:
        df: a request_sequences frame.
    """
    from pyspark.sql import functions as F

    pit = F.coalesce(~F.exists("ts", lambda t: t >= F.col("request_ts")), F.lit(False))
    return sequence_view(df).withColumn("point_in_time", pit)
