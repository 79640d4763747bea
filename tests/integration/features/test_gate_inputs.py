"""The gate on hostile raw partitions: every file checked, nothing skipped silently, ids in the domain, failures lose nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import ContractError
from features.gate import GateError, run_gate
from features.spark import SparkJobError

pytestmark = pytest.mark.spark

DS = "2026-01-05"


def _good_rows(raw, n: int = 3, prefix: str = "g") -> list[dict]:
    return [raw.event(f"{prefix}{i}", 1 + i, 10 + i, "click", raw.at(DS, 3, i)) for i in range(n)]


def _with_country(raw) -> tuple[list[dict], pa.Schema]:
    schema = pa.schema([*raw.schema, pa.field("country", pa.string())])
    rows = [dict(r, country="NL") for r in _good_rows(raw, 2, prefix="c")]
    return rows, schema


@pytest.mark.parametrize("name", ["a-first.parquet", "z-last.parquet"])
def test_an_extra_column_in_any_file_fails_naming_that_file(spark, tmp_path, raw, name):
    layout = Layout(tmp_path)
    raw.write_raw(layout, DS, _good_rows(raw), "m-complete.parquet")
    rows, schema = _with_country(raw)
    raw.write_raw(layout, DS, rows, name, schema=schema)
    with pytest.raises(ContractError, match=rf"{name}: schema does not match .*unexpected columns \['country'\]"):
        run_gate(spark, layout, DS)
    assert not Layout.partition(layout.valid_events, DS).exists()


def test_a_later_file_without_surface_is_a_schema_change_not_null_rows(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    raw.write_raw(layout, DS, _good_rows(raw), "a.parquet")
    no_surface = pa.schema([f for f in raw.schema if f.name != "surface"])
    rows = [{k: v for k, v in r.items() if k != "surface"} for r in _good_rows(raw, 2, prefix="s")]
    raw.write_raw(layout, DS, rows, "b.parquet", schema=no_surface)
    with pytest.raises(ContractError, match=r"b\.parquet: schema does not match .*missing columns \['surface'\]"):
        run_gate(spark, layout, DS)


def test_hidden_data_files_are_refused_and_markers_are_reported(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    part = raw.write_raw(layout, DS, _good_rows(raw), "part-0.parquet").parent
    raw.write_raw(layout, DS, _good_rows(raw, 2, prefix="h"), "_late.parquet")
    with pytest.raises(ContractError, match=r"_late\.parquet: a parquet file whose name starts with '_' or '\.'"):
        run_gate(spark, layout, DS)
    (part / "_late.parquet").unlink()
    (part / "_SUCCESS").write_bytes(b"")
    (part / ".keep").write_bytes(b"")
    result = run_gate(spark, layout, DS)
    assert result["files"] == 1 and result["ignored_files"] == [".keep", "_SUCCESS"]
    assert result["rows_in"] == result["rows_valid"] == 3


def test_truncated_and_non_parquet_files_are_named(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    raw.write_raw(layout, DS, _good_rows(raw), "a.parquet")
    whole = raw.write_raw(layout, DS, _good_rows(raw, 3, prefix="t"), "b.parquet")
    whole.write_bytes(whole.read_bytes()[:-20])  # the footer is cut off
    with pytest.raises(ContractError, match=r"b\.parquet: not a readable parquet file"):
        run_gate(spark, layout, DS)
    whole.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ContractError, match=r"b\.parquet: not a readable parquet file"):
        run_gate(spark, layout, DS)


def test_nanosecond_timestamps_are_named_not_a_spark_trace(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    ns = pa.schema([f.with_type(pa.timestamp("ns", tz="UTC")) if f.name == "ts" else f for f in raw.schema])
    path = Layout.partition(layout.raw_events, DS)
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_good_rows(raw), schema=ns), path / "ns.parquet", version="2.6")
    with pytest.raises(ContractError, match=r"ns\.parquet: column 'ts' holds nanosecond timestamps"):
        run_gate(spark, layout, DS)


def _corrupt_pages(path: Path) -> None:
    """Overwrite the bytes of the first column chunk's pages, keeping the footer readable."""
    meta = pq.read_metadata(path)
    col = meta.row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + col.total_compressed_size):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_pages_give_one_line_naming_the_file(spark, tmp_path, raw, monkeypatch, capsys):
    from afm.cli import main

    layout = Layout(tmp_path)
    bad = raw.write_raw(layout, DS, _good_rows(raw, 50), "broken.parquet")
    _corrupt_pages(bad)
    with pytest.raises(SparkJobError, match=r"^gate ds=2026-01-05: Spark failed: .*broken\.parquet") as info:
        run_gate(spark, layout, DS)
    assert "\n" not in str(info.value)

    monkeypatch.setattr(sys, "argv", ["afm", "features", "gate", "--home", str(tmp_path), "--ds", DS])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("afm: error: SparkJobError: ") and "broken.parquet" in err[0]


def test_ids_outside_the_domain_are_quarantined_with_a_reason(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    rows = _good_rows(raw, 2)
    rows += [
        raw.event("z0", 5, 0, "click", raw.at(DS, 4)),  # item 0 is the padding id
        raw.event("z1", 5, -3, "save", raw.at(DS, 4, 1)),
        raw.event("z2", 0, 7, "click", raw.at(DS, 4, 2)),
        raw.event("z3", -1, 0, "click", raw.at(DS, 4, 3)),
    ]
    raw.write_raw(layout, DS, rows)
    result = run_gate(spark, layout, DS)
    assert result["rows_valid"] == 2 and result["rows_quarantined"] == 4
    assert result["by_reason"] == {"item_id_out_of_domain": 3, "user_id_out_of_domain": 2}
    assert result["gx_unexpected_raw"]["item_id_out_of_domain"] == 3
    assert result["gx_unexpected_raw"]["user_id_out_of_domain"] == 2
    assert result["gx_agrees"] is True and result["gx"]["raw_events:valid"] is True
    q = raw.read_table(Layout.partition(layout.quarantine_events, DS)).set_index("event_id")["reason"].to_dict()
    assert q == {
        "z0": "item_id_out_of_domain",
        "z1": "item_id_out_of_domain",
        "z2": "user_id_out_of_domain",
        "z3": "user_id_out_of_domain;item_id_out_of_domain",
    }
    valid = raw.read_table(Layout.partition(layout.valid_events, DS))
    assert valid["item_id"].min() >= 1 and valid["user_id"].min() >= 1


def _tree(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_rerun_leaves_the_good_run_byte_identical(spark, tmp_path, raw):
    layout = Layout(tmp_path)
    good = [*_good_rows(raw, 3), raw.event("bad0", 1, 5, "like", raw.at(DS, 6))]
    raw.write_raw(layout, DS, good)
    run_gate(spark, layout, DS)
    published = (layout.valid_events, layout.quarantine_events, layout.reports)
    before = _tree(*published)
    assert any("valid/events/ds=" in k for k in before) and any("quarantine/events/ds=" in k for k in before)

    all_bad = [raw.event(f"b{i}", 1, i + 1, "like", raw.at(DS, 5, i)) for i in range(3)]
    raw.write_raw(layout, DS, all_bad)  # the same day, replaced by a partition with no valid row
    with pytest.raises(GateError, match=r"no valid rows among 3 raw events.*earlier outputs of ds=2026-01-05 are unch"):
        run_gate(spark, layout, DS)
    assert _tree(*published) == before  # every published file, to the byte

    failed = Layout.partition(layout.failed, DS) / "gate"
    report = json.loads((failed / "gate.json").read_text())
    assert report["status"] == "failed" and report["rows_quarantined"] == 3
    kept = raw.read_table(failed / "quarantine" / "events")
    assert len(kept) == 3 and set(kept["reason"]) == {"unknown_action"}
    assert not [p for p in layout.valid_events.iterdir() if p.name.startswith(".")]  # no staging left behind

    raw.write_raw(layout, DS, good)  # repaired: the rerun publishes again and the failed run is cleared
    run_gate(spark, layout, DS)
    assert not failed.exists()
    again = _tree(*published)
    assert {k: v for k, v in again.items() if k.endswith(".json")} == {
        k: v for k, v in before.items() if k.endswith(".json")
    }
