"""The afm CLI turns known failures into one clear line and a non-zero exit."""

from __future__ import annotations

import sys

import pytest

from serving.cli import main, run_afm


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


def test_missing_java_is_one_sentence(monkeypatch) -> None:
    from features import spark

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(spark.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="Spark needs Java 17"):
        spark.require_java()


def test_serve_passes_the_body_limit_to_the_app(tmp_path, monkeypatch) -> None:
    import uvicorn
    from click.testing import CliRunner

    import serving.app
    from serving.cli import cli

    built: list[dict] = []
    monkeypatch.setattr(serving.app, "create_app", lambda layout, **kw: built.append(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    runner = CliRunner()
    assert runner.invoke(cli, ["serve", "--home", str(tmp_path), "--max-body-bytes", "4096"]).exit_code == 0
    monkeypatch.setenv("AFM_MAX_BODY_BYTES", "8192")
    assert runner.invoke(cli, ["serve", "--home", str(tmp_path)]).exit_code == 0
    monkeypatch.delenv("AFM_MAX_BODY_BYTES")
    assert runner.invoke(cli, ["serve", "--home", str(tmp_path)]).exit_code == 0
    assert [kw.get("max_body_bytes") for kw in built] == [4096, 8192, None]  # None: the app's default

    result = runner.invoke(cli, ["serve", "--home", str(tmp_path), "--max-body-bytes", "0"])
    assert result.exit_code == 2 and "--max-body-bytes" in result.output
