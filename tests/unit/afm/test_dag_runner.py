import datetime as dt

import pytest

from afm.dag_runner import parse_run


def test_parse_run_gives_midnight_utc_logical_date() -> None:
    assert parse_run("activity_features=2026-01-02") == (
        "activity_features",
        dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
    )


@pytest.mark.parametrize("spec", ["activity_features", "=2026-01-02", "activity_features=2026-02-30"])
def test_parse_run_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_run(spec)
