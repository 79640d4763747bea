"""Airflow glue: one task = one ``afm`` command for the run's day; assets, retries and alerts.

DAG files stay thin (schedule, params, wiring); what a task does is the same ``afm``
command an on-call engineer runs by hand.

* **The run's day.** ``{ds}`` in a command becomes the day the run works on: the UTC date of
  its logical date (time-scheduled runs and backfills), or, for a run triggered by assets,
  the newest day those asset events carry (:func:`afm.alerts.run_day`). ``{prev_ds}`` is the
  day before it.
* **Assets.** A task that writes a dataset names it in ``outlets``; its asset event carries
  ``{"ds": day}``, which is how a triggered DAG learns the day (:mod:`afm.assets`).
* **Retries where they help.** A task retries with exponential backoff (:data:`RETRY`) when it
  fails for a reason that may pass (a Spark executor lost, a file system hiccup); an error
  that names bad data or bad settings (:func:`is_not_transient`: the gate, the GX suites, the
  contract, a missing input) fails at once, since a retry would fail the same way.
* **Alerts.** Every failed try of a task that will not be retried writes a structured alert
  (:func:`afm.alerts.task_failed`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from typing import Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import CronDataIntervalTimetable
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from afm.alerts import run_day, task_failed
from afm.cli import run_afm
from afm.kubernetes_profile import execution, operators
from features.config import Layout, parse_ds

#: All DAGs run in UTC; the run for day D has logical date D 00:00 and starts when D is over.
START_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

#: retries for failures that may pass: 30 s, 60 s, … (at most 10 min) between tries
RETRY: dict[str, Any] = {
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=10),
}
#: every task of every DAG: retries as above, and an alert when a task fails for good
DEFAULT_ARGS: dict[str, Any] = {**RETRY, "on_failure_callback": task_failed}

#: names of the error classes that say the data or the settings are wrong (a retry cannot help)
NOT_TRANSIENT = (
    "ContractError", "GateError", "QualityError", "SequenceError", "PointInTimeError", "FeatureStoreError",
    "SettingsError", "RegistryError", "RolloutError", "UsageError", "BadParameter",
)  # fmt: skip


def daily_after_midnight(hour: int = 0) -> CronDataIntervalTimetable:
    """A daily data-interval schedule: the run for day D starts at D+1 ``hour``:00 UTC."""
    return CronDataIntervalTimetable(f"0 {hour} * * *", timezone="UTC")


def is_not_transient(exc: BaseException) -> bool:
    """True for errors that name bad data, bad settings or a missing input: a retry would fail the same way."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & set(NOT_TRANSIENT)) or isinstance(exc, ValueError | FileNotFoundError | KeyError)


def fill_days(args: Sequence[str], ds: str | None) -> list[str]:
    """Replace ``{ds}`` (the run's day) and ``{prev_ds}`` (the day before) in command arguments.

    Raises:
        AirflowFailException: an argument needs the day and the run has none.
    """
    needs_day = any("{ds}" in a or "{prev_ds}" in a for a in args)
    if ds is None:
        if needs_day:
            raise AirflowFailException("this run has no day: no logical date, and no triggering asset event names one")
        return list(args)
    prev = (parse_ds(ds) - dt.timedelta(days=1)).isoformat()
    return [a.replace("{prev_ds}", prev).replace("{ds}", ds) for a in args]


def raw_events_arrived(task_id: str = "raw_events_arrived") -> Any:
    """A sensor that waits for the day's raw event partition (a folder holding parquet files).

    It pokes every 5 minutes in reschedule mode (no worker slot held while it waits) and
    fails after 2.5 hours, which raises an alert: the day's data did not arrive (the DAG's
    3-hour deadline would fail the run soon after anyway).
    """
    from airflow.providers.standard.sensors.python import PythonSensor

    def _arrived(**context: Any) -> bool:
        ds = run_day(context)
        if ds is None:
            raise AirflowFailException("this run has no day to wait for")
        layout = Layout.at(None)
        return any(layout.partition(layout.raw_events, ds).glob("*.parquet"))

    return PythonSensor(
        task_id=task_id, python_callable=_arrived, mode="reschedule", poke_interval=300, timeout=150 * 60,
        retries=0, doc_md="Waits for `raw/events/ds=D/*.parquet`.",
    )  # fmt: skip


def afm_step(
    task_id: str,
    *args: str,
    outlets: Sequence[Any] = (),
    skip_when_missing: bool = False,
    needs_env: str | None = None,
    spark: bool = False,
    trainjob: str | None = None,
    **task_kwargs: Any,
) -> Any:
    """An Airflow task that runs ``afm ARGS`` for the run's day: in-process, or on the cluster.

    The profile is ``AFM_EXECUTION`` (:func:`afm.kubernetes_profile.execution`). ``local`` (the
    default) runs the command in the task's process. ``kubernetes`` runs it as a
    ``SparkApplication`` when ``spark``, as the ``TrainJob`` of template ``trainjob`` when that
    is given, else in a pod (:mod:`afm.kubernetes_profile`). The task id, its place in the DAG,
    its outlets and its skips are the same in both profiles.

    Args:
        task_id: Airflow task id.
        *args: the ``afm`` command line, e.g. ``"features", "gate", "--ds", "{ds}"``.
        outlets: assets the command writes; each event carries ``{"ds": the run's day}``.
        skip_when_missing: a missing input (FileNotFoundError) skips the task instead of
            failing it: nothing to do yet (e.g. no corpus of the previous day on the first day).
        needs_env: the task is skipped, saying so, when this environment variable is unset
            (e.g. ``AFM_SERVICE_URL``: no running service to roll out to).
        spark: the command starts a Spark session (kubernetes profile: a SparkApplication).
        trainjob: the TrainJob template it trains with in the kubernetes profile (``afm-pretrain``).
        **task_kwargs: passed to the operator (retries, depends_on_past, …).

    Example:
        >>> gate = afm_step("gate", "features", "gate", "--ds", "{ds}", spark=True)  # doctest: +SKIP
    """
    if execution() == "kubernetes":
        ops = operators()
        common = {
            "task_id": task_id,
            "afm_args": list(args),
            "outlets": list(outlets),
            "doc_md": f"`afm {' '.join(args)}`",
        }
        if spark:
            return ops["spark"](**common, **task_kwargs)
        if trainjob:
            return ops["train"](**common, template_name=trainjob, skip_when_missing=skip_when_missing, **task_kwargs)
        return ops["pod"](**common, needs_env=needs_env, skip_when_missing=skip_when_missing, **task_kwargs)

    def _run(**context: Any) -> None:
        if needs_env and not os.environ.get(needs_env):
            raise AirflowSkipException(f"{needs_env} is not set: nothing to do for afm {' '.join(args)}")
        ds = run_day(context)
        argv = fill_days(args, ds)
        try:
            run_afm(*argv)
        except FileNotFoundError as exc:
            if skip_when_missing:
                raise AirflowSkipException(f"nothing to do yet: {exc}") from exc
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if is_not_transient(exc):
                raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
            raise
        for asset in outlets:
            context["outlet_events"][asset].extra = {"ds": ds}

    _run.__doc__ = "afm " + " ".join(args)
    return PythonOperator(
        task_id=task_id,
        python_callable=_run,
        outlets=list(outlets),
        doc_md=f"`afm {' '.join(args)}`",
        **task_kwargs,
    )
