"""The afm CLI turns known failures into one clear line and a non-zero exit."""

from __future__ import annotations

import sys

import pytest

from afm.cli import main, run_afm


def _run(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["afm", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0)


def test_rollback_without_history_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    assert _run(monkeypatch, "model", "rollback", "--home", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("afm: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_ds_is_a_usage_error(tmp_path, monkeypatch, capsys) -> None:
    assert _run(monkeypatch, "features", "gate", "--ds", "2026-13-01", "--home", str(tmp_path)) == 2
    assert "--ds must be a date like" in capsys.readouterr().err


def test_run_afm_raises_for_dag_tasks(tmp_path) -> None:
    # a DAG task must fail (not exit the worker) when its step fails
    with pytest.raises(FileNotFoundError, match="no ranking examples under .*run the feature pipeline first"):
        run_afm("train", "finetune", "--home", str(tmp_path), "--no-promote")


def test_a_missing_input_exits_66_for_the_kubernetes_profile(tmp_path, monkeypatch, capsys) -> None:
    # a pod or TrainJob step with skip_when_missing is skipped on this status (afm.kubernetes_profile)
    from afm.kubernetes_profile import EXIT_NOTHING_TO_DO

    assert _run(monkeypatch, "train", "finetune", "--home", str(tmp_path), "--no-promote") == EXIT_NOTHING_TO_DO == 66
    assert "no ranking examples" in capsys.readouterr().err
