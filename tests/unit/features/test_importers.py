"""Importers: action mapping, timestamps, items, input validation, real-data counts."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import EVENT_SCHEMA, ITEM_SCHEMA, ContractError
from features.importers import (
    genre_vector,
    import_movielens,
    import_sasrec,
    import_taobao,
    rating_action,
    write_events,
)

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
UTC = dt.UTC


def _events(layout: Layout):
    t = pq.read_table(layout.raw_events)  # ds comes back as a partition column
    return t.drop_columns(["ds"]).to_pandas() if "ds" in t.column_names else t.to_pandas()


def _items(layout: Layout):
    t = pq.read_table(layout.items / "items.parquet")
    assert t.schema.equals(ITEM_SCHEMA)
    return t.to_pandas().set_index("item_id")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def movielens_dir(tmp_path) -> Path:
    src = tmp_path / "ml"
    # 2020-01-01 00:00:00 UTC = 1577836800; 1577923200 = the next day
    _write(
        src / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "1,10,4.0,1577836800\n"
        "1,20,3.5,1577836860\n"
        "2,10,3.0,1577923200\n"
        "2,30,2.5,1577923260\n"
        "3,99,5.0,1577923300\n",
    )
    _write(src / "tags.csv", "userId,movieId,tag,timestamp\n1,10,funny,1577836900\n")
    _write(
        src / "movies.csv",
        "movieId,title,genres\n"
        '10,"Heat (1995)",Action|Crime|Thriller\n'
        "20,Untitled Film,Comedy\n"
        "30,Future Movie (2030),(no genres listed)\n",
    )
    return src


def test_rating_action_levels():
    assert [rating_action(r) for r in (5.0, 4.0, 3.5, 3.0, 2.5, 0.5)] == [
        "rate_high",
        "rate_high",
        "rate_mid",
        "rate_mid",
        "rate_low",
        "rate_low",
    ]


def test_genre_vector_normalized_and_stable():
    v = genre_vector(["Action", "Crime"])
    assert len(v) == 16 and abs(np.linalg.norm(v) - 1) < 1e-6
    assert v == genre_vector(["Action", "Crime"])
    assert v != genre_vector(["Comedy"])
    assert genre_vector([]) is None


def test_import_movielens(tmp_path, movielens_dir):
    layout = Layout(tmp_path / "home")
    summary = import_movielens(movielens_dir, layout)
    assert summary["n_events"] == 6 and summary["n_ratings"] == 5 and summary["n_tags"] == 1
    assert summary["actions"] == {"rate_high": 2, "rate_low": 1, "rate_mid": 2, "tag": 1}
    assert layout.available_days(layout.raw_events) == ["2020-01-01", "2020-01-02"]
    assert summary["n_days"] == 2 and summary["n_users"] == 3 and summary["n_items"] == 4
    ev = _events(layout).set_index("event_id")
    assert ev.loc["ml-r-0", "action"] == "rate_high" and ev.loc["ml-r-1", "action"] == "rate_mid"
    assert ev.loc["ml-r-2", "action"] == "rate_mid" and ev.loc["ml-r-3", "action"] == "rate_low"
    assert ev.loc["ml-t-0", "action"] == "tag" and ev.loc["ml-t-0", "item_id"] == 10
    assert ev.loc["ml-r-3", "ts"] == dt.datetime(2020, 1, 2, 0, 1, tzinfo=UTC)
    assert (ev["surface"] == "import").all() and ev["request_id"].isna().all()
    items = _items(layout)
    assert items.loc[10, "created_at"] == dt.datetime(1995, 1, 1, tzinfo=UTC)
    assert items.loc[10, "category"] == "Action"
    assert abs(np.linalg.norm(items.loc[10, "content"]) - 1) < 1e-6
    # no year in the title -> first event time
    assert items.loc[20, "created_at"] == dt.datetime(2020, 1, 1, 0, 1, tzinfo=UTC)
    # year after the first event -> never later than the first event; no genres -> no category/content
    assert items.loc[30, "created_at"] == dt.datetime(2020, 1, 2, 0, 1, tzinfo=UTC)
    assert items.loc[30, "category"] is None and items.loc[30, "content"] is None
    # rated but missing from movies.csv
    assert items.loc[99, "category"] is None
    # no event before its item exists
    assert (ev["ts"].values >= items.loc[ev["item_id"], "created_at"].values).all()


def test_import_is_deterministic(tmp_path, movielens_dir):
    hashes = []
    for name in ("a", "b"):
        root = tmp_path / name
        import_movielens(movielens_dir, Layout(root))
        hashes.append(
            {
                str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*")
                if p.is_file()
            }
        )
    assert hashes[0] == hashes[1] and len(hashes[0]) > 2


def test_movielens_input_errors(tmp_path, movielens_dir):
    layout = Layout(tmp_path / "home")
    (movielens_dir / "ratings.csv").write_text("userId,movieId,stars,timestamp\n1,10,4.0,1577836800\n")
    with pytest.raises(ContractError, match=r"ratings\.csv.*missing column\(s\) \['rating'\]"):
        import_movielens(movielens_dir, layout)
    (movielens_dir / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,four,1577836800\n")
    with pytest.raises(ContractError, match=r"ratings\.csv, line 2: bad value in column 'rating'"):
        import_movielens(movielens_dir, layout)
    (movielens_dir / "ratings.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        import_movielens(movielens_dir, layout)
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        import_movielens(tmp_path / "nope", layout)


def test_import_sasrec_synthesizes_ordered_timestamps(tmp_path):
    src = _write(tmp_path / "seq.txt", "1 5\n2 7\n1 6\n1 5\n2 8\n")
    layout = Layout(tmp_path / "home")
    summary = import_sasrec(src, layout, start_ds="2026-03-01")
    assert summary["n_events"] == 5 and summary["n_users"] == 2 and summary["n_items"] == 4
    assert summary["actions"] == {"click": 5}
    ev = _events(layout).set_index("event_id")
    start = dt.datetime(2026, 3, 1, tzinfo=UTC)
    minutes = {eid: int((ev.loc[eid, "ts"] - start).total_seconds() // 60) for eid in ev.index}
    assert minutes == {"sr-0": 0, "sr-1": 0, "sr-2": 1, "sr-3": 2, "sr-4": 1}
    # per-user order in the file == order by (ts, event_id)
    ordered = ev.reset_index().sort_values(["ts", "event_id"])
    assert ordered[ordered["user_id"] == 1]["item_id"].tolist() == [5, 6, 5]
    items = _items(layout)
    assert (items["created_at"] == start).all() and items["content"].isna().all()
    bad = _write(tmp_path / "bad.txt", "1 5\n1\n")
    with pytest.raises(ContractError, match=r"bad\.txt, line 2: expected 'user item'"):
        import_sasrec(bad, layout, start_ds="2026-03-01")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        import_sasrec(tmp_path / "missing.txt", layout, start_ds="2026-03-01")


def test_import_taobao_mapping(tmp_path):
    src = _write(
        tmp_path / "tb.csv",
        "1,100,7,pv,1511544070\n1,100,7,cart,1511544080\n2,101,8,fav,1511544090\n2,100,7,buy,1511630000\n",
    )
    layout = Layout(tmp_path / "home")
    summary = import_taobao(src, layout)
    assert summary["actions"] == {"click": 1, "download": 1, "save": 1, "share": 1}
    assert summary["behaviors"] == {"pv": 1, "fav": 1, "cart": 1, "buy": 1}
    assert summary["n_days"] == 2
    ev = _events(layout).set_index("event_id")
    assert ev.loc["tb-1", "action"] == "share" and ev.loc["tb-3", "action"] == "download"
    items = _items(layout)
    assert items.loc[100, "category"] == "7" and items.loc[101, "category"] == "8"
    assert items.loc[100, "created_at"] == dt.datetime.fromtimestamp(1511544070, UTC)
    bad = _write(tmp_path / "bad.csv", "1,100,7,pv,1511544070\n1,100,7,like,1511544080\n")
    with pytest.raises(ContractError, match=r"bad\.csv, line 2: column 'behavior' has unknown value 'like'"):
        import_taobao(bad, layout)
    short = _write(tmp_path / "short.csv", "1,100,pv,1511544070\n")
    with pytest.raises(ContractError, match="expected 5 columns"):
        import_taobao(short, layout)


def _event_table(**overrides) -> pa.Table:
    cols = {
        "event_id": ["a", "b"],
        "user_id": [1, 2],
        "item_id": [3, 4],
        "action": ["click", "save"],
        "surface": ["home", "import"],
        "ts": [dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 1, 3, 5, tzinfo=UTC)],
        "request_id": [None, None],
        "dwell_ms": [None, None],
    }
    cols.update(overrides)
    return pa.table(cols, schema=EVENT_SCHEMA) if "action" not in overrides else pa.table(cols)


def test_write_events_checks_contract_and_replaces_partitions(tmp_path):
    layout = Layout(tmp_path)
    stale = Layout.partition(layout.raw_events, "2019-05-05")
    stale.mkdir(parents=True)
    (stale / "part-0.parquet").write_bytes(b"old")
    counts = write_events(layout, _event_table())
    assert counts == {"2026-01-01": 1, "2026-01-03": 1}
    assert layout.available_days(layout.raw_events) == ["2026-01-01", "2026-01-03"]
    with pytest.raises(ContractError, match=r"'action' has values outside the contract: \['purchase'\]"):
        write_events(layout, _event_table(action=["click", "purchase"]))
    with pytest.raises(ContractError, match="event_id is not unique"):
        write_events(layout, _event_table(event_id=["a", "a"]).cast(EVENT_SCHEMA))
    with pytest.raises(ContractError, match=r"missing columns \['surface'\]"):
        write_events(layout, _event_table().drop_columns(["surface"]))
    no_user = _event_table().set_column(1, "user_id", pa.array([1, None], pa.int64()))
    with pytest.raises(ContractError, match="'user_id' has 1 null values"):
        write_events(layout, no_user)


# ------------------------------------------------------------------------ real data
realdata = pytest.mark.realdata


@realdata
def test_realdata_movielens(tmp_path):
    src = DATA / "movielens-latest-small"
    if not (src / "ratings.csv").exists():
        pytest.skip(f"{src} not present")
    summary = import_movielens(src, Layout(tmp_path))
    assert summary["n_ratings"] == 100_836 and summary["n_tags"] == 3_683
    assert summary["n_events"] == 104_519
    assert summary["actions"]["tag"] == 3_683
    assert summary["n_users"] == 610 and summary["n_items"] == 9_742


@realdata
def test_realdata_taobao(tmp_path):
    src = DATA / "taobao-sample" / "UserBehavior_head.csv"
    if not src.exists():
        pytest.skip(f"{src} not present")
    summary = import_taobao(src, Layout(tmp_path))
    assert summary["n_events"] == 4_321 and summary["n_users"] == 43
    assert summary["actions"] == {"click": 3926, "download": 77, "save": 128, "share": 190}


@realdata
def test_realdata_beauty(tmp_path):
    src = DATA / "amazon-beauty" / "beauty.txt"
    if not src.exists():
        pytest.skip(f"{src} not present")
    summary = import_sasrec(src, Layout(tmp_path), start_ds="2026-01-01")
    assert summary["n_events"] == 353_962
    assert summary["n_users"] == 40_226 and summary["n_items"] == 54_542


def test_write_events_and_items_refuse_ids_outside_the_domain(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(ContractError, match=r"1 item_id values are outside the id domain 1\.\.\d+ \(lowest 0"):
        write_events(layout, _event_table(item_id=[0, 4]))
    with pytest.raises(ContractError, match=r"1 user_id values are outside the id domain .*lowest -7"):
        write_events(layout, _event_table(user_id=[-7, 2]))
    assert not layout.raw_events.exists()  # nothing was written


def test_importers_shift_zero_based_ids_into_the_domain(tmp_path):
    from features.contract import MIN_ID

    src = _write(tmp_path / "seq.txt", "0 0\n0 3\n1 0\n")  # 0-based users and items
    layout = Layout(tmp_path / "home")
    summary = import_sasrec(src, layout, start_ds="2026-03-01")
    assert summary["id_offsets"] == {"user_id": 1, "item_id": 1}
    ev = _events(layout).set_index("event_id")
    assert ev["user_id"].to_dict() == {"sr-0": 1, "sr-1": 1, "sr-2": 2}
    assert ev["item_id"].to_dict() == {"sr-0": 1, "sr-1": 4, "sr-2": 1}
    assert sorted(_items(layout).index) == [1, 4] and ev["item_id"].min() >= MIN_ID

    tb = _write(tmp_path / "tb.csv", "-2,0,7,pv,1511544070\n5,-4,8,fav,1511544090\n")
    summary = import_taobao(tb, Layout(tmp_path / "tb"))
    assert summary["id_offsets"] == {"user_id": 3, "item_id": 5}
    ev = _events(Layout(tmp_path / "tb")).set_index("event_id")
    assert ev.loc["tb-0", "user_id"] == 1 and ev.loc["tb-0", "item_id"] == 5
    assert ev.loc["tb-1", "user_id"] == 8 and ev.loc["tb-1", "item_id"] == 1
    assert sorted(_items(Layout(tmp_path / "tb")).index) == [1, 5]


def test_movielens_ids_already_in_the_domain_are_kept(tmp_path, movielens_dir):
    summary = import_movielens(movielens_dir, Layout(tmp_path / "home"))
    assert summary["id_offsets"] == {"user_id": 0, "item_id": 0}


def test_movielens_zero_movie_id_is_shifted_in_events_and_catalogue(tmp_path):
    src = tmp_path / "ml0"
    _write(src / "ratings.csv", "userId,movieId,rating,timestamp\n1,0,4.0,1577836800\n1,2,3.0,1577836860\n")
    _write(src / "movies.csv", "movieId,title,genres\n0,Zero (1999),Drama\n2,Two (2001),Comedy\n")
    layout = Layout(tmp_path / "home")
    summary = import_movielens(src, layout)
    assert summary["id_offsets"] == {"user_id": 0, "item_id": 1}
    items = _items(layout)
    assert sorted(items.index) == [1, 3] and items.loc[1, "category"] == "Drama"
    assert sorted(_events(layout)["item_id"]) == [1, 3]


def test_bad_items_leave_the_earlier_raw_data_as_it_was(tmp_path, movielens_dir):
    from features.importers import write_events_and_items

    layout = Layout(tmp_path / "home")
    import_movielens(movielens_dir, layout)
    before = {p: p.read_bytes() for p in sorted(layout.root.rglob("*")) if p.is_file()}
    items = pa.table(
        {
            "item_id": pa.array([3, 4], pa.int64()),
            "created_at": pa.array([None, None], pa.timestamp("us", tz="UTC")),
            "category": pa.array([None, None], pa.string()),
            "content": pa.array([None, None], pa.list_(pa.float32())),
        }
    )
    with pytest.raises(ContractError, match="'created_at' has 2 null values"):
        write_events_and_items(layout, _event_table(), items, "test")
    assert {p: p.read_bytes() for p in sorted(layout.root.rglob("*")) if p.is_file()} == before
