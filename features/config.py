"""Where every step reads and writes: one root directory (``AFM_HOME``, default ``./var``).

All steps take their locations from :class:`Layout`, so a test points a whole pipeline
at a temporary directory with one argument, and a cluster run points it at object
storage by setting ``AFM_HOME``.

Layout under the root::

    raw/events/ds=YYYY-MM-DD/       raw activity (synthetic or imported)
    raw/items/                      item catalogue (items.parquet)
    valid/events/ds=…/              events that passed the gate
    quarantine/events/ds=…/         rejected events, with a ``reason`` column
    quarantine/realtime/ds=…/       events POST /v1/events rejected (JSON lines, with their reasons)
    features/user_sequences/ds=…/   per-user sequence snapshot
    features/ranking_examples/ds=…/ one row per impression, labels per action
    features/request_sequences/ds=…/ the user's sequence as of each request, once per request
    features/pretrain_corpus/ds=…/  fixed-length segments for pretraining
    features/reports/ds=…/          JSON summaries (row counts, GX results) of successful runs
    failed/ds=…/<step>/             the last failed run of a step: its report and rejected outputs
    feast/                          Feast registry, online store, offline parquet sources
    gx/                             Great Expectations project (suites, results, data docs)
    models/pinfm/<version>/         pretrained backbones
    models/ranker/<version>/        fine-tuned rankers; models/ranker/CURRENT names the served one
    airflow/                        AIRFLOW_HOME for local runs
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "var"


def afm_home() -> Path:
    return Path(os.environ.get("AFM_HOME", DEFAULT_HOME)).resolve()


def parse_ds(ds: str) -> dt.date:
    """Parse a ``YYYY-MM-DD`` partition date, with an error that names the bad value."""
    try:
        return dt.date.fromisoformat(ds)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--ds must be a date like 2026-01-05, got {ds!r}") from exc


def day_window(ds: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the UTC day ``ds``."""
    day = parse_ds(ds)
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def previous_ds(ds: str) -> str:
    return (parse_ds(ds) - dt.timedelta(days=1)).isoformat()


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(afm_home())

    @classmethod
    def at(cls, root: str | os.PathLike | None) -> Layout:
        return cls(Path(root).resolve()) if root is not None else cls.default()

    # raw inputs
    @property
    def raw_events(self) -> Path:
        return self.root / "raw" / "events"

    @property
    def items(self) -> Path:
        return self.root / "raw" / "items"

    # gate outputs
    @property
    def valid_events(self) -> Path:
        return self.root / "valid" / "events"

    @property
    def quarantine_events(self) -> Path:
        return self.root / "quarantine" / "events"

    @property
    def quarantine_realtime(self) -> Path:
        """Realtime events the service rejected: ``ds=<day received>/*.jsonl``, one JSON object per event."""
        return self.root / "quarantine" / "realtime"

    # feature tables
    @property
    def user_sequences(self) -> Path:
        return self.root / "features" / "user_sequences"

    @property
    def ranking_examples(self) -> Path:
        return self.root / "features" / "ranking_examples"

    @property
    def request_sequences(self) -> Path:
        return self.root / "features" / "request_sequences"

    @property
    def pretrain_corpus(self) -> Path:
        return self.root / "features" / "pretrain_corpus"

    @property
    def reports(self) -> Path:
        return self.root / "features" / "reports"

    @property
    def failed(self) -> Path:
        """Failed runs, kept aside: ``failed/ds=…/<step>/`` (published outputs are never touched by a failure)."""
        return self.root / "failed"

    # stores and models
    @property
    def feast(self) -> Path:
        return self.root / "feast"

    @property
    def gx(self) -> Path:
        return self.root / "gx"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def runs(self) -> Path:
        """Training run directories (checkpoints for resume, metrics logs, curves)."""
        return self.root / "runs"

    @property
    def airflow(self) -> Path:
        return self.root / "airflow"

    @staticmethod
    def partition(table: Path, ds: str) -> Path:
        parse_ds(ds)
        return table / f"ds={ds}"

    def available_days(self, table: Path) -> list[str]:
        """Sorted ``ds`` values that have a partition under ``table``."""
        if not table.exists():
            return []
        return sorted(p.name.split("=", 1)[1] for p in table.iterdir() if p.is_dir() and p.name.startswith("ds="))


def ds_for_logical_date(logical_date: dt.datetime) -> str:
    """The partition day a DAG run processes: the UTC date of its logical date.

    The DAGs use data-interval timetables, so the run for day D has logical date D 00:00
    UTC and runs once D is over (Airflow 3's default cron timetable has zero-length
    intervals, so the interval itself is not used).
    """
    if logical_date.tzinfo is None:
        raise ValueError(f"logical date {logical_date!r} has no timezone; expected an aware UTC datetime")
    return logical_date.astimezone(dt.UTC).date().isoformat()
