"""One day of the data pipeline in one Spark session: gate → sequences → examples → corpus → Feast sources → data docs."""

from __future__ import annotations

import logging
from typing import Any

from features.config import Layout, parse_ds
from features.tables import MAX_SEQ_LEN, SEGMENT_LEN

log = logging.getLogger(__name__)


def run_day(
    layout: Layout,
    ds: str,
    master: str | None = None,
    *,
    max_len: int = MAX_SEQ_LEN,
    segment_len: int = SEGMENT_LEN,
) -> dict[str, Any]:
    """Run every Spark step of day ``ds`` in one session and return each step's result.

    The Feast export runs only when ``features.store.export_feast_sources`` is importable
    (it is skipped with a log line otherwise). A failing step raises and stops the day.

    Args:
        layout: data root.
        ds: partition day ``YYYY-MM-DD``.
        master: Spark master (default ``$AFM_SPARK_MASTER`` or ``local[*]``).
        max_len: sequence cap for user and request sequences.
        segment_len: pretraining segment length.

    Returns:
        ``{"gate": …, "sequences": …, "examples": …, "corpus": …, "feast": … | "skipped: …"}``.
    """
    parse_ds(ds)
    from features.corpus import build_pretrain_corpus
    from features.examples import build_ranking_examples
    from features.gate import run_gate
    from features.sequences import build_user_sequences
    from features.spark import spark_session

    results: dict[str, Any] = {}
    with spark_session(master) as spark:
        results["gate"] = run_gate(spark, layout, ds)
        results["sequences"] = build_user_sequences(spark, layout, ds, max_len)
        results["examples"] = build_ranking_examples(spark, layout, ds, max_len)
        results["corpus"] = build_pretrain_corpus(spark, layout, ds, segment_len)
        try:
            from features.store import export_feast_sources
        except ImportError as exc:
            log.info("Feast export skipped for ds=%s: %s", ds, exc)
            results["feast"] = f"skipped: {exc}"
        else:
            results["feast"] = export_feast_sources(spark, layout, ds)
    from features.quality import build_data_docs

    results["data_docs"] = build_data_docs(layout)
    log.info(
        "run-day ds=%s: %d valid / %d quarantined events, %d users, %d examples, %d corpus segments",
        ds,
        results["gate"]["rows_valid"],
        results["gate"]["rows_quarantined"],
        results["sequences"]["users"],
        results["examples"]["examples"],
        results["corpus"]["segments"],
    )
    return results
