"""Airflow glue: one task = one ``afm`` command for the run's day.

DAG files stay thin (schedule, params, wiring); what a task does is the same ``afm``
command an on-call engineer runs by hand.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import CronDataIntervalTimetable

from afm.cli import run_afm
from features.config import ds_for_logical_date

#: All DAGs run in UTC; the run for day D has logical date D 00:00 and starts when D is over.
START_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def daily_after_midnight(hour: int = 0) -> CronDataIntervalTimetable:
    """A daily data-interval schedule: the run for day D starts at D+1 ``hour``:00 UTC."""
    return CronDataIntervalTimetable(f"0 {hour} * * *", timezone="UTC")


def fill_ds(args: tuple[str, ...], logical_date: dt.datetime) -> list[str]:
    """Replace ``{ds}`` in command arguments with the run's day (from its logical date)."""
    ds = ds_for_logical_date(logical_date)
    return [a.replace("{ds}", ds) for a in args]


def afm_step(task_id: str, *args: str, **task_kwargs: Any) -> PythonOperator:
    """An Airflow task that runs ``afm ARGS`` in-process; ``{ds}`` in ARGS becomes the run's day.

    Args:
        task_id: Airflow task id.
        *args: the ``afm`` command line, e.g. ``"features", "gate", "--ds", "{ds}"``.
        **task_kwargs: passed to the operator (retries, depends_on_past, …).

    Example:
        >>> gate = afm_step("gate", "features", "gate", "--ds", "{ds}")  # doctest: +SKIP
    """

    def _run(logical_date: dt.datetime) -> None:
        run_afm(*fill_ds(args, logical_date))

    _run.__doc__ = "afm " + " ".join(args)
    return PythonOperator(task_id=task_id, python_callable=_run, doc_md=f"`afm {' '.join(args)}`", **task_kwargs)
