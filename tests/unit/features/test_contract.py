"""Event contract: vocabularies, row validation, Spark schema diff."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from features.config import Layout
from features.contract import (
    ACTION_IDS,
    ACTIONS,
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    EVENT_SPARK_TYPES,
    EXPLICIT_ACTIONS,
    IMPRESSION,
    LABEL_ACTIONS,
    POSITIVE_ACTIONS,
    SURFACE_IDS,
    SURFACES,
    ContractError,
    check_event_schema,
    diff_spark_schema,
    validate_event_record,
)

GOOD_DTYPES = [(c, EVENT_SPARK_TYPES[c]) for c in EVENT_COLUMNS]


def _record(**kw) -> dict:
    rec = {
        "event_id": "e1",
        "user_id": 1,
        "item_id": 2,
        "action": "click",
        "surface": "home",
        "ts": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "request_id": None,
        "dwell_ms": None,
    }
    rec.update(kw)
    return rec


def test_vocabularies_are_consistent():
    assert IMPRESSION in ACTIONS and IMPRESSION not in EXPLICIT_ACTIONS
    assert set(EXPLICIT_ACTIONS) == set(ACTIONS) - {IMPRESSION}
    assert set(LABEL_ACTIONS) <= set(EXPLICIT_ACTIONS)
    assert set(POSITIVE_ACTIONS) <= set(EXPLICIT_ACTIONS) and "hide" not in POSITIVE_ACTIONS
    assert sorted(ACTION_IDS.values()) == list(range(1, len(ACTIONS) + 1))  # 0 = padding
    assert sorted(SURFACE_IDS.values()) == list(range(1, len(SURFACES) + 1))
    assert tuple(EVENT_SCHEMA.names) == EVENT_COLUMNS == tuple(EVENT_SPARK_TYPES)


def test_validate_event_record_accepts_a_valid_record():
    assert validate_event_record(_record()) == []
    assert validate_event_record(_record(request_id="r1", dwell_ms=1200, action="impression")) == []


def test_validate_event_record_names_each_problem():
    assert validate_event_record(_record(user_id=None)) == ["null_user_id"]
    assert validate_event_record(_record(action="purchase")) == ["unknown_action"]
    assert validate_event_record(_record(surface="email")) == ["unknown_surface"]
    rec = _record(event_id=None, ts=None, action="purchase")
    assert validate_event_record(rec) == ["null_event_id", "null_ts", "unknown_action"]
    missing = _record()
    del missing["item_id"]
    assert validate_event_record(missing) == ["null_item_id"]
    # a null action is reported once, as null, not also as unknown
    assert validate_event_record(_record(action=None)) == ["null_action"]


def test_diff_spark_schema_ok_with_ds_and_ntz():
    assert diff_spark_schema(GOOD_DTYPES).ok
    assert diff_spark_schema([*GOOD_DTYPES, ("ds", "date")]).ok
    ntz = [(c, "timestamp_ntz" if c == "ts" else t) for c, t in GOOD_DTYPES]
    assert diff_spark_schema(ntz).ok
    assert diff_spark_schema(GOOD_DTYPES).describe() == "schema matches the event contract"


def test_diff_spark_schema_reports_missing_unexpected_and_wrong_types():
    dtypes = [(c, t) for c, t in GOOD_DTYPES if c != "dwell_ms"]
    dtypes = [(c, "int" if c == "user_id" else t) for c, t in dtypes] + [("extra", "string")]
    diff = diff_spark_schema(dtypes)
    assert not diff.ok
    assert diff.missing == ("dwell_ms",)
    assert diff.unexpected == ("extra",)
    assert diff.wrong_type == (("user_id", "bigint", "int"),)
    text = diff.describe()
    assert "missing columns ['dwell_ms']" in text and "unexpected columns ['extra']" in text
    assert "column 'user_id' has type int, expected bigint" in text


def test_check_event_schema_raises_naming_the_partition():
    check_event_schema(GOOD_DTYPES, "raw ds=2026-01-01")
    with pytest.raises(ContractError, match=r"raw ds=2026-01-01: .*missing columns \['ts'\]"):
        check_event_schema([(c, t) for c, t in GOOD_DTYPES if c != "ts"], "raw ds=2026-01-01")


@pytest.mark.spark
def test_written_partition_matches_contract_in_spark(tmp_path):
    """What the shared writer produces reads back in Spark with exactly the contract types."""
    pyspark_sql = pytest.importorskip("pyspark.sql")
    from features.importers import write_events

    layout = Layout(tmp_path)
    table = pa.table(
        {
            "event_id": ["a", "b"],
            "user_id": [1, 2],
            "item_id": [3, 4],
            "action": ["impression", "click"],
            "surface": ["home", "home"],
            "ts": [dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC), dt.datetime(2026, 1, 1, 10, 1, tzinfo=dt.UTC)],
            "request_id": ["r1", "r1"],
            "dwell_ms": [None, 1500],
        },
        schema=EVENT_SCHEMA,
    )
    write_events(layout, table)
    existing = pyspark_sql.SparkSession.getActiveSession()  # reuse (and keep) a session another test started
    spark = existing or (
        pyspark_sql.SparkSession.builder.master("local[2]")
        .appName("test_contract")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    try:
        df = spark.read.parquet(str(layout.raw_events))
        assert diff_spark_schema(df.dtypes).ok, diff_spark_schema(df.dtypes).describe()
        rows = df.selectExpr("action", "CAST(ts AS LONG) AS epoch_s", "ds").orderBy("epoch_s").collect()
        assert [r.action for r in rows] == ["impression", "click"]
        assert rows[1].epoch_s == int(dt.datetime(2026, 1, 1, 10, 1, tzinfo=dt.UTC).timestamp())
        assert str(rows[0].ds) == "2026-01-01"
    finally:
        if existing is None:
            spark.stop()


def test_id_domain_reserves_the_padding_id_and_negatives():
    from features.contract import MAX_ID, MIN_ID, id_in_domain

    assert MIN_ID == 1 and MAX_ID == 2**63 - 1
    assert [id_in_domain(v) for v in (0, -5, 1, MAX_ID, MAX_ID + 1, True, "3", 2.0)] == [
        False,
        False,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert validate_event_record(_record(item_id=0)) == ["item_id_out_of_domain"]
    assert validate_event_record(_record(user_id=-3, item_id=-1)) == ["user_id_out_of_domain", "item_id_out_of_domain"]


def test_the_padding_id_lies_outside_the_id_domain():
    from features.contract import MIN_ID, PADDING_ID, id_in_domain

    assert PADDING_ID < MIN_ID and not id_in_domain(PADDING_ID)
