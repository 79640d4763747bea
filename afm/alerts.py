"""Structured alerts: a failed task or a missed deadline becomes one JSON line, and a webhook call.

Every alert is appended to ``$AFM_HOME/alerts/alerts.jsonl`` (one JSON object per line:
``kind``, ``dag_id``, ``ds``, ``task_id``, ``try_number``, ``log_url``, ``error``, ``at``).
When ``$AFM_ALERT_WEBHOOK`` holds a URL the same object is POSTed there (Slack-style
incoming webhooks, PagerDuty Events bridges, …); a webhook that fails is logged and never
fails the task a second time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from features.config import Layout, ds_for_logical_date

log = logging.getLogger(__name__)

WEBHOOK_ENV = "AFM_ALERT_WEBHOOK"


def alerts_file(layout: Layout) -> Path:
    return layout.root / "alerts" / "alerts.jsonl"


def send_alert(record: Mapping[str, Any], layout: Layout | None = None) -> dict:
    """Append ``record`` (plus ``at``) to the alerts file and POST it to the webhook when one is set."""
    line = {**record, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path = alerts_file(layout or Layout.default())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:  # one short write: lines from parallel tasks do not interleave
        fh.write(json.dumps(line, sort_keys=True, default=str) + "\n")
    url = os.environ.get(WEBHOOK_ENV)
    if url:
        import httpx

        try:
            httpx.post(url, json=line, timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("alert webhook %s failed: %s", url, exc)
    log.error("ALERT %s", json.dumps(line, sort_keys=True, default=str))
    return line


def run_day(context: Mapping[str, Any]) -> str | None:
    """The day a run works on: from its logical date, else from the assets that triggered it."""
    logical_date = context.get("logical_date")
    if logical_date is not None:
        return ds_for_logical_date(logical_date)
    days = [
        ev.extra.get("ds")
        for events in (context.get("triggering_asset_events") or {}).values()
        for ev in events
        if getattr(ev, "extra", None)
    ]
    return max((d for d in days if d), default=None)


def task_failed(context: Mapping[str, Any]) -> None:
    """``on_failure_callback``: one alert naming the DAG, the day, the task and its log."""
    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    send_alert(
        {
            "kind": "task_failed",
            "dag_id": getattr(ti, "dag_id", None),
            "task_id": getattr(ti, "task_id", None),
            "run_id": getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None),
            "ds": run_day(context),
            "try_number": getattr(ti, "try_number", None),
            "log_url": getattr(ti, "log_url", None),
            "error": f"{type(err).__name__}: {err}"[:1000] if (err := context.get("exception")) else None,
        }
    )


def run_failed(context: Mapping[str, Any]) -> None:
    """DAG ``on_failure_callback``: an alert when a run missed its deadline (``dagrun_timeout``).

    A run that failed because a task failed has alerted already (:func:`task_failed`); only
    the timeout, which fails the run with its tasks unfinished, alerts here.
    """
    if context.get("reason") != "timed_out":
        return
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    send_alert(
        {
            "kind": "deadline_missed",
            "dag_id": getattr(dag_run, "dag_id", None) or getattr(dag, "dag_id", None),
            "run_id": getattr(dag_run, "run_id", None),
            "ds": run_day(context),
            "deadline": str(getattr(dag, "dagrun_timeout", None) or ""),
        }
    )
