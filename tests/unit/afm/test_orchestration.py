"""A DAG task runs the same ``afm`` command as on-call, for the run's day."""

import datetime as dt

import pytest

import afm.orchestration as orchestration
from afm.orchestration import afm_step, fill_ds


def test_fill_ds_replaces_only_the_placeholder() -> None:
    args = ("features", "gate", "--ds", "{ds}")
    assert fill_ds(args, dt.datetime(2026, 3, 1, tzinfo=dt.UTC)) == ["features", "gate", "--ds", "2026-03-01"]


def test_afm_step_runs_the_command_for_the_logical_day(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(orchestration, "run_afm", lambda *args: calls.append(args))
    op = afm_step("gate", "features", "gate", "--ds", "{ds}", retries=2)
    assert op.task_id == "gate" and op.retries == 2
    assert "afm features gate --ds {ds}" in op.doc_md
    ny = dt.timezone(dt.timedelta(hours=-5))
    op.python_callable(logical_date=dt.datetime(2026, 1, 4, 23, 30, tzinfo=ny))  # Jan 5 in UTC
    assert calls == [("features", "gate", "--ds", "2026-01-05")]
