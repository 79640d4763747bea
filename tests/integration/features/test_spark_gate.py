"""The raw-events gate on planted bad rows: reason counts, GX agreement, valid/quarantine split, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import ContractError
from features.gate import GateError, run_gate
from features.quality import build_data_docs
from features.tables import QUARANTINE_SCHEMA

pytestmark = pytest.mark.spark

DS = "2026-01-05"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, spark, raw) -> tuple[Layout, dict]:
    """Two raw files of DS with planted bad rows; the gate is run once."""
    layout = Layout(tmp_path_factory.mktemp("gate"))
    at, ev = raw.at, raw.event
    part0 = [
        ev("e01", 1, 10, "click", at(DS, 8)),  # kept: first copy of e01 (same ts as the part-1 copy, earlier file)
        ev("e02", 1, 11, "impression", at(DS, 8, 1), request_id="r1"),
        ev("e03", None, 12, "click", at(DS, 9)),  # null_user_id
        ev("e04", 2, 13, "like", at(DS, 9, 30)),  # unknown_action
        ev("e05", 2, 14, "click", at("2026-01-07", 10)),  # ts_out_of_day (future)
        ev("e06", 2, 15, "save", at("2026-01-06")),  # ts_out_of_day (next day start is excluded)
        ev("e07", 3, 16, "click", at("2026-01-04", 23, 59, 59, 999_999), surface="moon"),  # two reasons
        ev("e08", 3, 17, "save", at(DS, 23, 59, 59, 999_999)),  # valid: last microsecond of the day
        ev("e09", 3, 18, "click", at(DS)),  # valid: first microsecond of the day
        ev("e10", 4, 20, "click", at(DS, 12)),  # duplicate of the earlier e10 below
        ev("e10", 4, 21, "click", at(DS, 11)),  # kept: earliest ts of e10
        ev(None, 4, 22, "click", at(DS, 14)),  # null_event_id
    ]
    part1 = [
        ev("e01", 1, 99, "click", at(DS, 8)),  # duplicate (same ts, later file)
        ev("e11", 4, 30, "hide", at(DS, 13), surface="search", dwell_ms=1500),
    ]
    raw.write_raw(layout, DS, part0, "part-0.parquet")
    raw.write_raw(layout, DS, part1, "part-1.parquet")
    return layout, run_gate(spark, layout, DS)


def test_gate_counts_per_reason_and_reconciles(planted):
    _, result = planted
    assert result["rows_in"] == 14
    assert result["rows_valid"] == 6
    assert result["rows_quarantined"] == 8
    assert result["rows_in"] == result["rows_valid"] + result["rows_quarantined"]
    assert result["by_reason"] == {
        "duplicate_event_id": 2,
        "null_event_id": 1,
        "null_user_id": 1,
        "ts_out_of_day": 3,
        "unknown_action": 1,
        "unknown_surface": 1,
    }


def test_gx_raw_counts_agree_with_quarantine(planted):
    _, result = planted
    gx = result["gx_unexpected_raw"]
    assert gx["null_user_id"] == result["by_reason"]["null_user_id"]
    assert gx["null_event_id"] == result["by_reason"]["null_event_id"]
    assert gx["unknown_action"] == result["by_reason"]["unknown_action"]
    assert gx["unknown_surface"] == result["by_reason"]["unknown_surface"]
    assert gx["ts_out_of_day"] == result["by_reason"]["ts_out_of_day"]
    # GX flags every copy of a duplicated id (e01 x2, e10 x2); the gate keeps one copy of each valid
    assert gx["duplicate_event_id"] == 4 == result["by_reason"]["duplicate_event_id"] + result["duplicated_event_ids"]
    assert gx["null_item_id"] == gx["null_action"] == gx["null_surface"] == gx["null_ts"] == 0
    assert result["gx_agrees"] is True
    assert result["gx"] == {"raw_events:raw": False, "raw_events:valid": True}


def test_valid_rows_sorted_and_first_copy_kept(planted, raw):
    layout, _ = planted
    valid = raw.read_table(Layout.partition(layout.valid_events, DS))
    assert list(valid["event_id"]) == ["e09", "e01", "e02", "e10", "e11", "e08"]
    items = dict(zip(valid["event_id"], valid["item_id"], strict=True))
    assert items["e01"] == 10  # same ts: the copy from the earlier file wins
    assert items["e10"] == 21  # the earliest ts wins over file order
    schema = pq.read_schema(next(Layout.partition(layout.valid_events, DS).glob("*.parquet")))
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert schema.names == ["event_id", "user_id", "item_id", "action", "surface", "ts", "request_id", "dwell_ms"]


def test_quarantine_has_reasons(planted, raw):
    layout, _ = planted
    q = raw.read_table(Layout.partition(layout.quarantine_events, DS))
    assert list(q.columns) == QUARANTINE_SCHEMA.names
    by_item = dict(zip(q["item_id"], q["reason"], strict=True))
    assert by_item == {
        12: "null_user_id",
        13: "unknown_action",
        14: "ts_out_of_day",
        15: "ts_out_of_day",
        16: "unknown_surface;ts_out_of_day",
        99: "duplicate_event_id",
        20: "duplicate_event_id",
        22: "null_event_id",
    }


def test_report_and_data_docs_written(planted):
    layout, result = planted
    report = json.loads((Layout.partition(layout.reports, DS) / "gate.json").read_text())
    assert report["rows_valid"] == result["rows_valid"] and report["status"] == "ok"
    index = Path(build_data_docs(layout))
    assert index.name == "index.html" and index.is_file()
    assert str(index).startswith(str(layout.gx))


def test_gate_rerun_is_identical(planted, spark, raw):
    layout, first = planted
    before = {t: raw.read_table(Layout.partition(t, DS)) for t in (layout.valid_events, layout.quarantine_events)}
    again = run_gate(spark, layout, DS)
    assert {k: again[k] for k in ("rows_in", "rows_valid", "rows_quarantined", "by_reason")} == {
        k: first[k] for k in ("rows_in", "rows_valid", "rows_quarantined", "by_reason")
    }
    for table, frame in before.items():
        files = list(Layout.partition(table, DS).glob("*.parquet"))
        assert len(files) == 1
        assert raw.read_table(Layout.partition(table, DS)).equals(frame)


def test_missing_partition_names_the_path(spark, tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="raw events partition not found.*ds=2026-02-01"):
        run_gate(spark, layout, "2026-02-01")


def test_schema_change_fails_naming_columns(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    changed = pa.schema(
        [f if f.name != "user_id" else pa.field("user_id", pa.string()) for f in raw.schema]
        + [pa.field("country", pa.string())]
    )
    row = raw.event("x1", None, 1, "click", raw.at(DS, 1))
    row.update(user_id="u-1", country="NL")
    raw.write_raw(layout, DS, [row], schema=changed)
    with pytest.raises(ContractError) as info:
        run_gate(spark, layout, DS)
    msg = str(info.value)
    assert "'user_id' has type string, expected bigint" in msg
    assert "unexpected columns ['country']" in msg
    assert not Layout.partition(layout.valid_events, DS).exists()


def test_all_bad_partition_fails_keeping_quarantine_aside_and_earlier_output(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    rows = [raw.event(f"b{i}", 1, i + 1, "like", raw.at(DS, 5, i)) for i in range(3)]
    raw.write_raw(layout, DS, rows)
    earlier = Layout.partition(layout.valid_events, DS)
    earlier.mkdir(parents=True)
    (earlier / "old.parquet").write_bytes(b"earlier")
    with pytest.raises(GateError, match="no valid rows among 3 raw events"):
        run_gate(spark, layout, DS)
    failed = Layout.partition(layout.failed, DS) / "gate"
    q = raw.read_table(failed / "quarantine" / "events")
    assert len(q) == 3 and set(q["reason"]) == {"unknown_action"}
    assert (earlier / "old.parquet").read_bytes() == b"earlier"  # a failed run never touches published data
    assert not Layout.partition(layout.quarantine_events, DS).exists()
    report = json.loads((failed / "gate.json").read_text())
    assert report["status"] == "failed" and report["rows_quarantined"] == 3


def test_failing_output_suite_reports_counts_and_raises(spark, tmp_path, raw):
    from features import quality

    t = raw.at(DS, 1)
    rows = [(1, [10, 11], ["click", "save"], ["home", "home"], [t, t], t, 2)]
    rows += [(1, [12], ["click"], ["home"], [t], t, 0)]  # duplicate user, n_events below the sequence length
    df = spark.createDataFrame(
        rows,
        "user_id bigint, item_ids array<bigint>, actions array<string>, surfaces array<string>, ts array<timestamp>, "
        "last_ts timestamp, n_events bigint",
    )
    layout = Layout(tmp_path)
    summary = quality.validate_output(
        quality.sequence_view(df), "user_sequences", quality.user_sequences_expectations(8), DS, layout=layout
    )
    assert summary["success"] is False
    failed = {(r["expectation"], r["column"]): r["unexpected_count"] for r in summary["results"] if not r["success"]}
    assert failed == {
        ("expect_column_values_to_be_unique", "user_id"): 2,
        ("expect_column_values_to_be_in_set", "n_events_covers_sequence"): 1,
    }
    with pytest.raises(quality.QualityError, match="user_sequences.*be_unique\\(user_id\\): unexpected 2"):
        quality.require_success(summary, "test frame")


def test_spark_session_reuses_the_active_session(spark):
    from features.spark import spark_session

    with spark_session("local[1]") as again:
        assert again is spark
        assert again.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.range(3).count() == 3  # not stopped by the inner context
