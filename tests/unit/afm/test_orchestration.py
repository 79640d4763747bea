"""A DAG task runs the same ``afm`` command as on-call, for the run's day; it retries only what may pass."""

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

import afm.orchestration as orchestration
from afm.alerts import alerts_file, run_day, task_failed
from afm.orchestration import afm_step, fill_days, is_not_transient
from features.config import Layout
from features.contract import ContractError
from features.spark import SparkJobError


def test_fill_days_replaces_only_the_placeholders() -> None:
    args = ("train", "pretrain", "--ds", "{prev_ds}", "--note", "{ds}")
    assert fill_days(args, "2026-03-01") == ["train", "pretrain", "--ds", "2026-02-28", "--note", "2026-03-01"]
    assert fill_days(("features", "register"), None) == ["features", "register"]
    with pytest.raises(AirflowFailException, match="no day"):
        fill_days(("features", "gate", "--ds", "{ds}"), None)


def test_afm_step_runs_the_command_for_the_logical_day(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(orchestration, "run_afm", lambda *args: calls.append(args))
    op = afm_step("gate", "features", "gate", "--ds", "{ds}", retries=2)
    assert op.task_id == "gate" and op.retries == 2
    assert "afm features gate --ds {ds}" in op.doc_md
    ny = dt.timezone(dt.timedelta(hours=-5))
    op.python_callable(logical_date=dt.datetime(2026, 1, 4, 23, 30, tzinfo=ny))  # Jan 5 in UTC
    assert calls == [("features", "gate", "--ds", "2026-01-05")]


def _event(ds: str) -> SimpleNamespace:
    return SimpleNamespace(extra={"ds": ds})


def test_an_asset_triggered_run_takes_the_newest_day_of_its_events(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(orchestration, "run_afm", lambda *args: calls.append(args))
    outlet = SimpleNamespace(extra=None)
    op = afm_step("pretrain", "train", "pretrain", "--ds", "{prev_ds}", outlets=["corpus-asset"])
    events = {"corpus": [_event("2026-01-02"), _event("2026-01-04"), _event("2026-01-03")]}
    op.python_callable(logical_date=None, triggering_asset_events=events, outlet_events={"corpus-asset": outlet})
    assert calls == [("train", "pretrain", "--ds", "2026-01-03")]
    assert outlet.extra == {"ds": "2026-01-04"}  # the next DAG learns the day from the event


def test_bad_data_fails_at_once_and_a_missing_input_can_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(exc: Exception):
        def run(*_: str) -> None:
            raise exc

        return run

    monkeypatch.setattr(orchestration, "run_afm", fail(ContractError("raw file x.parquet is not parquet")))
    with pytest.raises(AirflowFailException, match="ContractError: raw file x.parquet"):
        afm_step("gate", "features", "gate", "--ds", "{ds}").python_callable(
            logical_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        )
    monkeypatch.setattr(orchestration, "run_afm", fail(FileNotFoundError("no corpus for ds=2025-12-31")))
    skip = afm_step("pretrain", "train", "pretrain", "--ds", "{prev_ds}", skip_when_missing=True)
    with pytest.raises(AirflowSkipException, match="nothing to do yet"):
        skip.python_callable(logical_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    monkeypatch.setattr(orchestration, "run_afm", fail(SparkJobError("executor lost")))
    with pytest.raises(SparkJobError):  # may pass: Airflow retries it
        afm_step("gate", "features", "gate", "--ds", "{ds}").python_callable(
            logical_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        )
    assert is_not_transient(ContractError("x")) and not is_not_transient(SparkJobError("x"))
    assert not is_not_transient(OSError("disk")) and is_not_transient(KeyError("k"))


def test_a_step_that_needs_a_setting_is_skipped_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFM_SERVICE_URL", raising=False)
    monkeypatch.setattr(orchestration, "run_afm", lambda *args: pytest.fail("must not run"))
    op = afm_step("roll_out", "roll-out", needs_env="AFM_SERVICE_URL")
    with pytest.raises(AirflowSkipException, match="AFM_SERVICE_URL is not set"):
        op.python_callable(logical_date=None)


def test_a_failed_task_writes_one_alert_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFM_HOME", str(tmp_path))
    monkeypatch.delenv("AFM_ALERT_WEBHOOK", raising=False)
    ti = SimpleNamespace(dag_id="activity_features", task_id="gate", try_number=1, log_url="http://ui/log", run_id="r1")
    context = {
        "task_instance": ti,
        "logical_date": dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        "exception": ContractError("raw file part-0.parquet is not parquet"),
    }
    task_failed(context)
    lines = alerts_file(Layout(tmp_path)).read_text().splitlines()
    assert len(lines) == 1
    alert = json.loads(lines[0])
    assert alert["kind"] == "task_failed" and alert["dag_id"] == "activity_features" and alert["task_id"] == "gate"
    assert alert["ds"] == "2026-01-02" and alert["log_url"] == "http://ui/log"
    assert alert["error"] == "ContractError: raw file part-0.parquet is not parquet" and alert["at"]


def test_run_day_without_a_logical_date_or_events_is_none() -> None:
    assert run_day({"logical_date": None}) is None
    assert run_day({"triggering_asset_events": {"a": [SimpleNamespace(extra={})]}}) is None


def test_a_run_past_its_deadline_alerts_and_a_run_failed_by_a_task_does_not_again(tmp_path: Path, monkeypatch) -> None:
    from afm.alerts import run_failed

    monkeypatch.setenv("AFM_HOME", str(tmp_path))
    monkeypatch.delenv("AFM_ALERT_WEBHOOK", raising=False)
    run = SimpleNamespace(dag_id="activity_features", run_id="scheduled__2026-01-02T00:00:00+00:00")
    dag = SimpleNamespace(dag_id="activity_features", dagrun_timeout=dt.timedelta(hours=3))
    context = {"dag_run": run, "dag": dag, "logical_date": dt.datetime(2026, 1, 2, tzinfo=dt.UTC)}
    run_failed({**context, "reason": "task_failure"})
    assert not alerts_file(Layout(tmp_path)).exists()  # the task alerted already
    run_failed({**context, "reason": "timed_out"})
    (alert,) = [json.loads(x) for x in alerts_file(Layout(tmp_path)).read_text().splitlines()]
    assert alert["kind"] == "deadline_missed" and alert["ds"] == "2026-01-02" and alert["deadline"] == "3:00:00"
