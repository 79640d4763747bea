"""A step publishes its staged outputs only when its checks pass; a failed step leaves earlier outputs as they were."""

import json
from pathlib import Path

import pytest

from features.config import Layout
from features.quality import QualityError
from features.spark import StagedPartition, finish_step, replace_dir

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


def _staged(layout: Layout, name: str, content: bytes = b"new") -> StagedPartition:
    out = StagedPartition.beside(Layout.partition(layout.root / "features" / name, DS))
    out.staged.mkdir(parents=True)
    (out.staged / "part-0.parquet").write_bytes(content)
    return out


def _publish_good(layout: Layout, name: str) -> Path:
    out = _staged(layout, name, b"good")
    finish_step(layout, DS, name, {"rows": 1}, [(_summary(True), out)])
    return out.final


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_passing_step_publishes_outputs_and_reports_ok(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    out = _staged(layout, "a")
    result = finish_step(layout, DS, "a", {"rows": 1}, [(_summary(True), out)])
    assert result["status"] == "ok"
    assert (out.final / "part-0.parquet").read_bytes() == b"new"
    assert not out.staged.exists()
    assert json.loads((Layout.partition(layout.reports, DS) / "a.json").read_text())["status"] == "ok"


def test_failed_suite_publishes_nothing_and_keeps_the_earlier_outputs_byte_identical(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    good, other = _publish_good(layout, "good"), _publish_good(layout, "other")
    before = _tree(layout.root / "features")
    new_good, new_other = _staged(layout, "good"), _staged(layout, "other")
    with pytest.raises(QualityError, match=r"not_be_null\(user_id\): unexpected 3.*nothing published"):
        finish_step(layout, DS, "good", {}, [(_summary(True), new_good), (_summary(False), new_other)])
    assert _tree(layout.root / "features") == before  # outputs and the good run's reports, to the byte
    assert (good / "part-0.parquet").read_bytes() == (other / "part-0.parquet").read_bytes() == b"good"
    failed = Layout.partition(layout.failed, DS) / "good"
    assert json.loads((failed / "good.json").read_text())["status"] == "failed"
    assert (failed / "features" / "other" / "part-0.parquet").read_bytes() == b"new"  # the rejected rows are kept
    assert not new_good.staged.exists() and not new_other.staged.exists()


def test_non_gx_failure_also_rejects(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    out = _staged(layout, "c")
    with pytest.raises(QualityError, match="2 examples have no request_sequences row"):
        finish_step(layout, DS, "c", {}, [(_summary(True), out)], "2 examples have no request_sequences row")
    assert not out.final.exists()


def test_a_later_success_clears_the_failed_run(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    with pytest.raises(QualityError):
        finish_step(layout, DS, "d", {}, [(_summary(False), _staged(layout, "d"))])
    assert (Layout.partition(layout.failed, DS) / "d").exists()
    _publish_good(layout, "d")
    assert not (Layout.partition(layout.failed, DS) / "d").exists()


def test_staging_restores_an_output_left_aside_by_an_interrupted_swap(tmp_path) -> None:
    layout = Layout.at(tmp_path)
    final = _publish_good(layout, "e")
    aside = final.with_name(f".{final.name}.old-deadbeef")
    final.rename(aside)  # what a crash between replace_dir's two renames leaves
    out = StagedPartition.beside(final)
    assert (final / "part-0.parquet").read_bytes() == b"good" and not aside.exists()
    assert not out.staged.exists()


def test_replace_dir_swaps_whole_folders(tmp_path) -> None:
    final, new = tmp_path / "t" / "ds=1", tmp_path / "t" / ".new"
    final.mkdir(parents=True)
    (final / "stale.parquet").write_bytes(b"x")
    new.mkdir()
    (new / "part-0.parquet").write_bytes(b"y")
    replace_dir(new, final)
    assert _tree(final) == {"part-0.parquet": b"y"}
    assert sorted(p.name for p in final.parent.iterdir()) == ["ds=1"]
