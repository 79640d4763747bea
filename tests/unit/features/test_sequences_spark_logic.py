"""The sequence building blocks against a pure-Python reference on random events (no files, no GX).

- ``aggregate_sequences`` + ``append_sequences`` day by day == the last ``max_len`` events of all days;
- ``segment_sequences`` == cutting each sequence from its newest end.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import random

import pytest

from features.contract import IMPRESSION
from features.corpus import segment_sequences
from features.sequences import aggregate_sequences, append_sequences, explicit_only, take_last

pytestmark = pytest.mark.spark

EVENT_DDL = "event_id string, user_id bigint, item_id bigint, action string, surface string, ts timestamp"
DAYS = ("2026-01-05", "2026-01-06", "2026-01-07")


@pytest.fixture(scope="module")
def spark():
    from features.spark import spark_session

    os.environ.setdefault("AFM_SPARK_SHUFFLE_PARTITIONS", "2")
    with spark_session("local[2]") as session:
        session.conf.set("spark.sql.shuffle.partitions", "2")
        yield session


def _random_days(seed: int) -> dict[str, list[tuple]]:
    """Events of 4 users over 3 days; many share a timestamp so event_id must break ties."""
    rng = random.Random(seed)
    out: dict[str, list[tuple]] = {}
    n = 0
    for ds in DAYS:
        start = dt.datetime.fromisoformat(ds).replace(tzinfo=dt.UTC)
        rows = []
        for _ in range(rng.randint(5, 25)):
            n += 1
            ts = start + dt.timedelta(minutes=rng.choice([0, 5, 5, 30, 600, 1439]))
            action = rng.choice(["click", "save", "hide", IMPRESSION, IMPRESSION])
            rows.append(
                (f"e{rng.randint(0, 10**6):07d}-{n}", rng.randint(1, 4), rng.randint(1, 50), action, "home", ts)
            )
        out[ds] = rows
    return out


def _reference(rows: list[tuple], max_len: int) -> dict[int, tuple[list[int], int]]:
    per_user: dict[int, list[tuple]] = {}
    for r in rows:
        if r[3] != IMPRESSION:
            per_user.setdefault(r[1], []).append(r)
    return {
        u: ([r[2] for r in sorted(evs, key=lambda r: (r[5], r[0]))][-max_len:], len(evs)) for u, evs in per_user.items()
    }


@pytest.mark.parametrize(("seed", "max_len"), [(1, 3), (2, 8), (3, 1000)])
def test_incremental_append_equals_reference(spark, seed, max_len):
    days = _random_days(seed)
    snap = None
    seen: list[tuple] = []
    for ds in DAYS:
        seen += days[ds]
        day = aggregate_sequences(explicit_only(spark.createDataFrame(days[ds], EVENT_DDL)), max_len).drop("n")
        snap = day if snap is None else append_sequences(snap, day, ["user_id"], max_len)
        got = {r["user_id"]: list(r["item_ids"]) for r in snap.collect()}
        want = {u: items for u, (items, _) in _reference(seen, max_len).items()}
        assert got == want, ds
    full = aggregate_sequences(explicit_only(spark.createDataFrame(seen, EVENT_DDL)), max_len).collect()
    ref = _reference(seen, max_len)
    assert {r["user_id"]: (list(r["item_ids"]), r["n"]) for r in full} == ref
    if max_len == 3:
        assert any(n > max_len for _, n in ref.values())  # the cap is exercised


def test_take_last(spark):
    df = spark.createDataFrame([([1, 2, 3, 4, 5],), ([1],), ([],)], "a array<int>")
    from pyspark.sql import functions as F

    got = [r["x"] for r in df.select(take_last(F.col("a"), 3).alias("x")).collect()]
    assert got == [[3, 4, 5], [1], []]


def _segments_reference(items: list[int], seg: int) -> list[list[int]]:
    n = len(items)
    if n < 2:
        return []
    k = math.ceil(n / seg)
    cut = [items[max(0, n - (k - i) * seg) : n - (k - 1 - i) * seg] for i in range(k)]
    return [c for c in cut if len(c) >= 2]


@pytest.mark.parametrize("seg", [2, 3, 5])
def test_segments_equal_reference(spark, seg):
    ts0 = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    lengths = {1: 1, 2: 2, 3: 3, 4: 6, 5: 7, 6: 11}
    rows = []
    for user, n in lengths.items():
        items = list(range(user * 100, user * 100 + n))
        rows.append((user, items, ["click"] * n, ["home"] * n, [ts0 + dt.timedelta(seconds=i) for i in range(n)]))
    snap = spark.createDataFrame(
        rows,
        "user_id bigint, item_ids array<bigint>, actions array<string>, surfaces array<string>, ts array<timestamp>",
    )
    got: dict[int, list[list[int]]] = {}
    for r in sorted(segment_sequences(snap, seg).collect(), key=lambda r: (r["user_id"], r["segment"])):
        assert len(r["ts"]) == len(r["item_ids"]) == len(r["actions"])
        got.setdefault(r["user_id"], []).append(list(r["item_ids"]))
    want = {u: s for u, n in lengths.items() if (s := _segments_reference(list(range(u * 100, u * 100 + n)), seg))}
    assert got == want
    assert all(seg >= len(s) >= 2 for segs in got.values() for s in segs)
