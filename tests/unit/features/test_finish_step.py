"""A step whose output fails its checks leaves a failed report and no output partition."""

import json

import pytest

from features.config import Layout
from features.quality import QualityError
from features.spark import finish_step

DS = "2026-01-02"


def _summary(success: bool) -> dict:
    failed = (
        []
        if success
        else [
            {
                "expectation": "expect_column_values_to_not_be_null",
                "column": "user_id",
                "success": False,
                "unexpected_count": 3,
            }
        ]
    )
    return {"suite": "user_sequences", "success": success, "results": failed}


def _partition(layout: Layout, name: str):
    path = Layout.partition(layout.root / "features" / name, DS)
    path.mkdir(parents=True)
    (path / "part-0.parquet").write_bytes(b"x")
    return path


def test_passing_step_keeps_outputs_and_reports_ok(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    path = _partition(layout, "a")
    result = finish_step(layout, DS, "a", {"rows": 1}, [(_summary(True), path)])
    assert result["status"] == "ok" and path.exists()


def test_failed_suite_removes_every_output_and_names_the_expectation(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    good, bad = _partition(layout, "good"), _partition(layout, "bad")
    with pytest.raises(QualityError, match=r"not_be_null\(user_id\): unexpected 3"):
        finish_step(layout, DS, "b", {}, [(_summary(True), good), (_summary(False), bad)])
    assert not good.exists() and not bad.exists()
    report = json.loads((Layout.partition(layout.reports, DS) / "b.json").read_text())
    assert report["status"] == "failed"


def test_non_gx_failure_also_rejects(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    path = _partition(layout, "c")
    with pytest.raises(QualityError, match="2 examples have no request_sequences row"):
        finish_step(layout, DS, "c", {}, [(_summary(True), path)], "2 examples have no request_sequences row")
    assert not path.exists()
