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


def _layout() -> Layout:
    return Layout(Path(os.environ.get("AFM_HOME", "var")))


def send_alert(record: Mapping[str, Any], layout: Layout | None = None) -> dict:
    """Append ``record`` (plus ``at``) to the alerts file and POST it to the webhook when one is set."""
    line = {**record, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path = alerts_file(layout or _layout())
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


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


async def deadline_missed(context: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
    """Deadline callback (run by the triggerer): one alert naming the DAG run that is late.

    Airflow passes the run as the JSON of its REST API (``dag_run_id``, ``run_type``,
    ``logical_date``). A backfill of past days starts after their deadlines by definition: its
    runs are logged, not alerted.
    """
    context = context or {}
    dag_run = context.get("dag_run") or {}
    run_id = str(_field(dag_run, "dag_run_id") or _field(dag_run, "run_id") or "")
    run_type = str(_field(dag_run, "run_type") or "")
    if run_id.startswith("backfill__") or run_type.lower().endswith("backfill"):
        log.info("deadline passed for backfill run %s: no alert", run_id)
        return
    logical = _field(dag_run, "logical_date")
    send_alert(
        {
            "kind": "deadline_missed",
            "dag_id": kwargs.get("dag_id") or _field(dag_run, "dag_id"),
            "run_id": run_id or None,
            "ds": str(logical)[:10] if logical else None,
            "deadline": kwargs.get("deadline"),
            "deadline_time": str(_field(context.get("deadline") or {}, "deadline_time") or "") or None,
        }
    )
