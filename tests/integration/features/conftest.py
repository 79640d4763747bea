"""Fixtures for the Spark feature-job tests: a small local Spark session and raw-partition writers."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import EVENT_SCHEMA

UTC = dt.UTC

#: The contract's schema with every field nullable, so tests can plant NULLs in required columns.
LOOSE_EVENT_SCHEMA = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA])


@pytest.fixture(scope="module")
def spark() -> Iterator:
    """A local[2] Spark session for one test module (reused if one is already active)."""
    from features.spark import spark_session

    os.environ.setdefault("AFM_SPARK_SHUFFLE_PARTITIONS", "2")
    with spark_session("local[2]") as session:
        session.conf.set("spark.sql.shuffle.partitions", "2")
        yield session


def at(ds: str, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> dt.datetime:
    """A UTC datetime on day ``ds``."""
    day = dt.date.fromisoformat(ds)
    return dt.datetime(day.year, day.month, day.day, hour, minute, second, micro, tzinfo=UTC)


def event(
    event_id: str | None,
    user_id: int | None,
    item_id: int | None,
    action: str | None,
    ts: dt.datetime | None,
    surface: str | None = "home",
    request_id: str | None = None,
    dwell_ms: int | None = None,
) -> dict:
    """One raw event record following the contract's column names."""
    return {
        "event_id": event_id,
        "user_id": user_id,
        "item_id": item_id,
        "action": action,
        "surface": surface,
        "ts": ts,
        "request_id": request_id,
        "dwell_ms": dwell_ms,
    }


def write_raw(
    layout: Layout, ds: str, rows: list[dict], name: str = "part-0.parquet", schema: pa.Schema | None = None
) -> Path:
    """Write ``rows`` as one parquet file into the raw events partition of ``ds``."""
    part = Layout.partition(layout.raw_events, ds)
    part.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema or LOOSE_EVENT_SCHEMA)
    pq.write_table(table, part / name)
    return part / name


def read_table(path: Path) -> pd.DataFrame:
    """A parquet partition as pandas (pyarrow skips Spark's _SUCCESS and .crc files)."""
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="session")
def raw() -> SimpleNamespace:
    """The helpers above as one fixture (test modules should not import conftest): at, event, write_raw, read_table."""
    return SimpleNamespace(at=at, event=event, write_raw=write_raw, read_table=read_table, schema=LOOSE_EVENT_SCHEMA)
