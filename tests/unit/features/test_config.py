"""The partition day of a DAG run and the UTC day window."""

import datetime as dt

import pytest

from features.config import day_window, ds_for_logical_date, previous_ds


def test_ds_comes_from_the_logical_date_in_utc() -> None:
    # 23:30 on Jan 4 in New York is already Jan 5 in UTC
    ny = dt.timezone(dt.timedelta(hours=-5))
    assert ds_for_logical_date(dt.datetime(2026, 1, 4, 23, 30, tzinfo=ny)) == "2026-01-05"
    assert ds_for_logical_date(dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) == "2026-01-05"


def test_naive_logical_date_is_rejected() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        ds_for_logical_date(dt.datetime(2026, 1, 5))


def test_day_window_and_previous_day() -> None:
    start, end = day_window("2026-03-01")
    assert (end - start) == dt.timedelta(days=1) and start.tzinfo is not None
    assert previous_ds("2026-03-01") == "2026-02-28"
    with pytest.raises(ValueError, match="2026-1-5"):
        day_window("2026-1-5x")
