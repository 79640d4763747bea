"""Importers: map real data sets into the event contract, and the raw-data writer they share.

Every importer (and the synthetic world generator, :mod:`features.synth`) ends in the same
two writers:

- :func:`write_events` checks an event table against :data:`features.contract.EVENT_SCHEMA`
  and writes one ``raw/events/ds=YYYY-MM-DD/part-0.parquet`` per UTC day, rows ordered by
  ``(ts, event_id)``;
- :func:`write_items` writes ``raw/items/items.parquet`` ordered by ``item_id``.

Importers call :func:`write_events_and_items`, which checks both tables before it writes
either, so an input that breaks the contract leaves the data root as it was.

Both write with fixed parquet options and no wall-clock metadata, so the same input gives
the same bytes. A data root holds one raw data set at a time: writing events replaces every
existing ``ds=…`` partition under ``raw/events`` (stale days of an earlier, larger data set
would otherwise be mixed into the pipeline).

Action mappings (all imported events have surface ``"import"``, no ``request_id``, no
``dwell_ms``; there are no impressions in these data sets):

- MovieLens ``ratings.csv``: rating >= 4 -> ``rate_high``; 3 <= rating < 4 -> ``rate_mid``;
  rating < 3 -> ``rate_low``. ``tags.csv`` -> ``tag``. ``event_id`` = ``ml-r-<row>`` /
  ``ml-t-<row>`` with ``<row>`` the 0-based data row of the csv file.
- SASRec/BERT4Rec ``user item`` files (e.g. Amazon Beauty): every line -> ``click``. The files
  have no timestamps, only the per-user order, so timestamps are synthesized: the k-th line
  (k = 0, 1, …) of a user is at ``start_ds`` 00:00 UTC + k minutes. ``event_id`` = ``sr-<line>``.
- Taobao UserBehavior (no header: user_id,item_id,category_id,behavior,unix_ts):
  ``pv`` -> ``click``, ``fav`` -> ``save``, ``cart`` -> ``share``, ``buy`` -> ``download``
  (four distinct contract actions; the contract has no ``cart``/``buy`` actions).
  ``event_id`` = ``tb-<line>``.

Ids: the contract's id domain is ``[MIN_ID, MAX_ID]`` (0 is the models' padding id). A
source whose user or item ids reach below ``MIN_ID`` (0-based or negative ids) has that
column shifted by one offset, ``MIN_ID - smallest id``, for events and items alike, so the
order and the distinctness of ids are kept; the import summary reports it under
``id_offsets`` (subtract it to get the source id back). :func:`write_events` and
:func:`write_items` refuse ids outside the domain.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.config import Layout, day_window
from features.contract import (
    ACTIONS,
    CONTENT_DIM,
    EVENT_SCHEMA,
    ID_COLUMNS,
    ITEM_SCHEMA,
    MAX_ID,
    MIN_ID,
    REQUIRED_EVENT_COLUMNS,
    SURFACES,
    ContractError,
)

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
PART_FILE = "part-0.parquet"
_US_PER_DAY = 86_400 * 1_000_000
_DS_DIR = re.compile(r"^ds=\d{4}-\d{2}-\d{2}$")

#: Taobao behaviour -> contract action.
TAOBAO_ACTIONS: dict[str, str] = {"pv": "click", "fav": "save", "cart": "share", "buy": "download"}


# ------------------------------------------------------------------------- writers
def write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` with fixed options (same table -> same bytes), atomically.

    Args:
        table: the arrow table to write.
        path: destination file; parent folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(
        table,
        tmp,
        compression="snappy",
        use_dictionary=True,
        write_statistics=True,
        version="2.6",
        data_page_size=1 << 20,
        row_group_size=1 << 20,
    )
    tmp.replace(path)


def _check_events(table: pa.Table, source: str) -> pa.Table:
    """Cast ``table`` to EVENT_SCHEMA and raise ContractError naming what breaks the contract."""
    missing = [f.name for f in EVENT_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ContractError(f"{source}: events are missing columns {missing}")
    table = table.select([f.name for f in EVENT_SCHEMA])
    for col in REQUIRED_EVENT_COLUMNS:
        n_null = table.column(col).null_count
        if n_null:
            raise ContractError(f"{source}: column {col!r} has {n_null} null values")
    try:
        table = table.cast(EVENT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ContractError(f"{source}: events do not cast to the event contract schema: {exc}") from exc
    for col, vocab in (("action", ACTIONS), ("surface", SURFACES)):
        bad = pc.filter(table.column(col), pc.invert(pc.is_in(table.column(col), value_set=pa.array(vocab))))
        if len(bad):
            raise ContractError(
                f"{source}: column {col!r} has values outside the contract: {sorted(set(bad.to_pylist()))[:5]}"
            )
    if pc.count_distinct(table.column("event_id")).as_py() != table.num_rows:
        raise ContractError(f"{source}: event_id is not unique")
    _check_id_domain(table, ID_COLUMNS, source)
    return table


def _check_id_domain(table: pa.Table, columns: tuple[str, ...], source: str) -> None:
    """Raise ContractError when a value of ``columns`` is below MIN_ID (int64 columns cannot exceed MAX_ID)."""
    for col in columns:
        below = pc.sum(pc.less(table.column(col), MIN_ID)).as_py() or 0
        if below:
            lowest = pc.min(table.column(col)).as_py()
            raise ContractError(
                f"{source}: {below} {col} values are outside the id domain {MIN_ID}..{MAX_ID} (lowest {lowest}; "
                f"0 is the padding id); the importers shift such ids into the domain"
            )


def domain_offset(column: str, source: str, *ids: np.ndarray | list[int]) -> int:
    """The shift that brings a source's ids into the id domain: 0 when they are already in it.

    Args:
        column: ``user_id`` or ``item_id`` (for messages).
        source: the input, for messages.
        *ids: every id of that column the source holds (events and catalogue).

    Returns:
        ``MIN_ID - smallest id`` when the smallest id is below MIN_ID, else 0.

    Raises:
        ContractError: the shift would push the largest id past MAX_ID.
    """
    present = [np.asarray(a, dtype=np.int64) for a in ids if len(a)]
    if not present:
        return 0
    lo = min(int(a.min()) for a in present)
    hi = max(int(a.max()) for a in present)
    if lo >= MIN_ID:
        return 0
    offset = MIN_ID - lo
    if hi > MAX_ID - offset:
        raise ContractError(
            f"{source}: {column} values span {lo}..{hi}; shifting them into the id domain {MIN_ID}..{MAX_ID} "
            "would overflow int64"
        )
    log.warning("%s: %s values start at %d; shifted by %+d into the id domain", source, column, lo, offset)
    return offset


def clear_partitions(table_dir: Path) -> None:
    """Remove every ``ds=YYYY-MM-DD`` folder under ``table_dir`` (nothing else)."""
    if not table_dir.exists():
        return
    for p in sorted(table_dir.iterdir()):
        if p.is_dir() and _DS_DIR.match(p.name):
            shutil.rmtree(p)


def write_day_partitions(
    table: pa.Table, table_dir: Path, ts_column: str, sort_by: list[str], replace_all: bool = True
) -> dict[str, int]:
    """Write ``table`` as ``table_dir/ds=…/part-0.parquet``, one partition per UTC day of ``ts_column``.

    Args:
        table: rows to write; ``ts_column`` must be a UTC timestamp[us] column without nulls.
        table_dir: the partitioned table's folder.
        ts_column: column that decides the day.
        sort_by: columns that order the rows inside a partition (ascending).
        replace_all: remove every existing ``ds=…`` partition under ``table_dir`` first; when
            False only the days present in ``table`` are overwritten.

    Returns:
        ``{ds: row count}`` for every written partition, in day order.
    """
    if replace_all:
        clear_partitions(table_dir)
    table = table.sort_by([(c, "ascending") for c in sort_by])
    micros = table.column(ts_column).cast(pa.int64()).to_numpy()
    days = np.floor_divide(micros, _US_PER_DAY)
    order = np.argsort(days, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        table = table.take(pa.array(order))
        days = days[order]
    counts: dict[str, int] = {}
    bounds = np.flatnonzero(np.diff(days)) + 1
    starts = np.concatenate([[0], bounds]) if len(days) else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [len(days)]]) if len(days) else np.array([], dtype=np.int64)
    epoch = dt.date(1970, 1, 1)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        ds = (epoch + dt.timedelta(days=int(days[s]))).isoformat()
        write_parquet(table.slice(s, e - s), Layout.partition(table_dir, ds) / PART_FILE)
        counts[ds] = e - s
    return counts


def write_events(layout: Layout, table: pa.Table, source: str = "events", replace_all: bool = True) -> dict[str, int]:
    """Check events against the contract and write them as ``raw/events/ds=…`` partitions.

    Rows are ordered by ``(ts, event_id)`` inside each day.

    Args:
        layout: data root.
        table: events with the EVENT_SCHEMA columns (castable types).
        source: name of the input, used in error messages.
        replace_all: replace all existing raw event partitions of ``layout`` (default); when
            False only the days in ``table`` are overwritten (for writing day by day).

    Returns:
        ``{ds: number of events}`` in day order.

    Raises:
        ContractError: a column is missing or has the wrong type, a required value is null,
            an action/surface is outside the vocabulary, or event ids repeat.
    """
    table = _check_events(table, source)
    return write_day_partitions(table, layout.raw_events, "ts", ["ts", "event_id"], replace_all=replace_all)


def check_items(table: pa.Table, source: str = "items") -> pa.Table:
    """Cast ``table`` to ITEM_SCHEMA and raise ContractError naming what breaks it.

    Args:
        table: items with the ITEM_SCHEMA columns.
        source: name of the input, used in error messages.

    Returns:
        The items, cast to ITEM_SCHEMA.

    Raises:
        ContractError: missing columns, wrong types, null ids/created_at, repeated item ids,
            or ids outside the id domain.
    """
    missing = [f.name for f in ITEM_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ContractError(f"{source}: items are missing columns {missing}")
    table = table.select([f.name for f in ITEM_SCHEMA])
    for col in ("item_id", "created_at"):
        if table.column(col).null_count:
            raise ContractError(f"{source}: column {col!r} has {table.column(col).null_count} null values")
    try:
        table = table.cast(ITEM_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ContractError(f"{source}: items do not cast to the item schema: {exc}") from exc
    if pc.count_distinct(table.column("item_id")).as_py() != table.num_rows:
        raise ContractError(f"{source}: item_id is not unique")
    _check_id_domain(table, ("item_id",), source)
    return table


def write_items(layout: Layout, table: pa.Table, source: str = "items") -> Path:
    """Check items against ITEM_SCHEMA (:func:`check_items`) and write ``raw/items/items.parquet`` ordered by item_id.

    Args:
        layout: data root.
        table: items with the ITEM_SCHEMA columns.
        source: name of the input, used in error messages.

    Returns:
        The written file.

    Raises:
        ContractError: see :func:`check_items`.
    """
    return _write_checked_items(layout, check_items(table, source))


def _write_checked_items(layout: Layout, items: pa.Table) -> Path:
    path = layout.items / ITEMS_FILE
    write_parquet(items.sort_by([("item_id", "ascending")]), path)
    return path


def write_events_and_items(layout: Layout, events: pa.Table, items: pa.Table, source: str) -> dict[str, int]:
    """Check both tables first, then replace the raw events and the item catalogue (an importer's last step).

    A contract error in either table leaves the data root as it was.

    Returns:
        ``{ds: number of events}`` in day order.
    """
    events = _check_events(events, source)
    items = check_items(items, source)
    per_day = write_day_partitions(events, layout.raw_events, "ts", ["ts", "event_id"])
    _write_checked_items(layout, items)
    return per_day


def _summary(fmt: str, layout: Layout, per_day: dict[str, int], actions: pa.Array, n_users: int, n_items: int) -> dict:
    vc = pc.value_counts(actions).to_pylist()
    return {
        "format": fmt,
        "n_events": int(sum(per_day.values())),
        "n_days": len(per_day),
        "first_ds": min(per_day) if per_day else None,
        "last_ds": max(per_day) if per_day else None,
        "n_users": int(n_users),
        "n_items": int(n_items),
        "actions": {r["values"]: int(r["counts"]) for r in sorted(vc, key=lambda r: r["values"])},
        "events_dir": str(layout.raw_events),
        "items_file": str(layout.items / ITEMS_FILE),
    }


# ------------------------------------------------------------------------ readers
def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path


def _read_csv_columns(path: Path, columns: dict[str, type]) -> dict[str, list]:
    """Read a headed csv into ``{column: list of values}``, checking the header names ``columns``."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration as exc:
            raise ContractError(f"{path}: empty file, expected a header with columns {list(columns)}") from exc
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ContractError(f"{path}: missing column(s) {missing}; header is {header}")
        idx = {c: header.index(c) for c in columns}
        out: dict[str, list] = {c: [] for c in columns}
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                for c, conv in columns.items():
                    out[c].append(conv(row[idx[c]]))
            except (IndexError, ValueError) as exc:
                raise ContractError(f"{path}, line {lineno}: bad value in column {c!r}: {exc}") from exc
    return out


def _ts_array(seconds: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(seconds, dtype=np.int64) * 1_000_000, type=pa.int64()).cast(
        EVENT_SCHEMA.field("ts").type
    )


def _events_table(
    event_ids: list[str], users: np.ndarray, items: np.ndarray, actions: list[str] | pa.Array, ts_seconds: np.ndarray
) -> pa.Table:
    n = len(event_ids)
    return pa.table(
        {
            "event_id": pa.array(event_ids, pa.string()),
            "user_id": pa.array(np.asarray(users, dtype=np.int64)),
            "item_id": pa.array(np.asarray(items, dtype=np.int64)),
            "action": pa.array(actions, pa.string()) if not isinstance(actions, pa.Array) else actions,
            "surface": pa.array(["import"] * n, pa.string()),
            "ts": _ts_array(ts_seconds),
            "request_id": pa.nulls(n, pa.string()),
            "dwell_ms": pa.nulls(n, pa.int64()),
        },
        schema=EVENT_SCHEMA,
    )


def _first_seen(items: np.ndarray, ts_seconds: np.ndarray) -> dict[int, int]:
    """Earliest event time (unix seconds) per item."""
    if len(items) == 0:
        return {}
    order = np.lexsort((ts_seconds, items))
    it, t = items[order], ts_seconds[order]
    first = np.concatenate([[True], it[1:] != it[:-1]])
    return dict(zip(it[first].tolist(), t[first].tolist(), strict=True))


# ---------------------------------------------------------------------- MovieLens
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")


def rating_action(rating: float) -> str:
    """MovieLens rating -> contract action (>= 4 high, 3..3.5 mid, < 3 low).

    Args:
        rating: a MovieLens star rating (0.5 .. 5).
    """
    if rating >= 4.0:
        return "rate_high"
    if rating >= 3.0:
        return "rate_mid"
    return "rate_low"


def genre_vector(genres: list[str], dim: int = CONTENT_DIM) -> list[float] | None:
    """Signed feature hashing of a genre list into ``dim`` dims, L2-normalized; None when empty.

    Args:
        genres: genre names (e.g. ``["Action", "Comedy"]``).
        dim: output size.
    """
    vec = np.zeros(dim, dtype=np.float64)
    for g in genres:
        h = zlib.crc32(g.strip().lower().encode("utf-8"))
        vec[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return None
    return (vec / norm).astype(np.float32).tolist()


def genre_list(genres: str) -> list[str]:
    """movies.csv ``genres`` ("Action|Comedy", or "(no genres listed)") → genre names."""
    if genres.strip() == "(no genres listed)":
        return []
    return [g for g in genres.split("|") if g.strip()]


def read_movielens_ratings_and_movies(src_dir: Path) -> tuple[dict[str, list], dict[str, list]]:
    """The columns of ``ratings.csv`` and ``movies.csv`` in a MovieLens folder.

    Raises:
        FileNotFoundError: a file is missing (named).
        ContractError: a file lacks a column or has a bad value (line named).
    """
    ratings = _read_csv_columns(
        _require_file(src_dir / "ratings.csv", "movielens ratings"),
        {"userId": int, "movieId": int, "rating": float, "timestamp": int},
    )
    movies = _read_csv_columns(
        _require_file(src_dir / "movies.csv", "movielens movies"), {"movieId": int, "title": str, "genres": str}
    )
    return ratings, movies


def _movie_year(title: str) -> int | None:
    m = _YEAR.search(title.strip())
    return int(m.group(1)) if m else None


def import_movielens(src_dir: Path, layout: Layout) -> dict:
    """Import MovieLens (``ratings.csv``, ``tags.csv``, ``movies.csv``) into the event contract.

    Items: ``created_at`` = Jan 1 (UTC) of the year in the title, or the item's first event
    when the title has no year; never later than the item's first event (a rating before
    the release year moves it earlier). ``category`` = first genre (None for
    "(no genres listed)"), ``content`` = :func:`genre_vector` of the genres. Movies that
    have events but no row in ``movies.csv`` get no category/content.

    Args:
        src_dir: folder with ratings.csv, tags.csv (optional) and movies.csv.
        layout: data root to write ``raw/events`` and ``raw/items`` under.

    Returns:
        Counts: events per action, days, users, items.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"movielens: source folder not found: {src_dir}")
    ratings, movies = read_movielens_ratings_and_movies(src_dir)
    tags_path = src_dir / "tags.csv"
    if tags_path.exists():
        tags = _read_csv_columns(tags_path, {"userId": int, "movieId": int, "timestamp": int})
    else:
        log.warning("movielens: %s not found, importing ratings only", tags_path)
        tags = {"userId": [], "movieId": [], "timestamp": []}

    n_r, n_t = len(ratings["userId"]), len(tags["userId"])
    event_ids = [f"ml-r-{i}" for i in range(n_r)] + [f"ml-t-{i}" for i in range(n_t)]
    user_off = domain_offset("user_id", f"movielens {src_dir}", ratings["userId"], tags["userId"])
    item_off = domain_offset("item_id", f"movielens {src_dir}", ratings["movieId"], tags["movieId"], movies["movieId"])
    users = np.array(ratings["userId"] + tags["userId"], dtype=np.int64) + user_off
    items = np.array(ratings["movieId"] + tags["movieId"], dtype=np.int64) + item_off
    movies["movieId"] = [m + item_off for m in movies["movieId"]]
    ts = np.array(ratings["timestamp"] + tags["timestamp"], dtype=np.int64)
    actions = [rating_action(r) for r in ratings["rating"]] + ["tag"] * n_t
    events = _events_table(event_ids, users, items, actions, ts)

    first = _first_seen(items, ts)
    fallback = int(ts.min()) if len(ts) else 0
    rows: dict[int, tuple[int, str | None, list[float] | None]] = {}
    for mid, title, genres in zip(movies["movieId"], movies["title"], movies["genres"], strict=True):
        glist = genre_list(genres)
        year = _movie_year(title)
        seen = first.get(mid)
        created = int(dt.datetime(year, 1, 1, tzinfo=dt.UTC).timestamp()) if year else (seen or fallback)
        if seen is not None:
            created = min(created, seen)
        rows[mid] = (created, glist[0] if glist else None, genre_vector(glist))
    for mid, seen in first.items():
        if mid not in rows:
            rows[mid] = (seen, None, None)
    ids = sorted(rows)
    items_table = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "created_at": _ts_array(np.array([rows[i][0] for i in ids], dtype=np.int64)),
            "category": pa.array([rows[i][1] for i in ids], pa.string()),
            "content": pa.array([rows[i][2] for i in ids], pa.list_(pa.float32())),
        }
    )
    per_day = write_events_and_items(layout, events, items_table, source=f"movielens {src_dir}")
    out = _summary("movielens", layout, per_day, events.column("action"), len(set(users.tolist())), len(ids))
    out.update({"n_ratings": n_r, "n_tags": n_t, "id_offsets": {"user_id": user_off, "item_id": item_off}})
    return out


# ------------------------------------------------------------------------- SASRec
def import_sasrec(path: Path, layout: Layout, start_ds: str) -> dict:
    """Import a SASRec/BERT4Rec ``user item`` file (chronological per user, no timestamps).

    Every line becomes a ``click``; the k-th line of a user (k from 0) gets the timestamp
    ``start_ds`` 00:00 UTC + k minutes, which keeps each user's order (users interleave).
    Items: ``created_at`` = ``start_ds`` 00:00 UTC, no category, no content.

    Args:
        path: the ``user item`` text file (whitespace separated integers).
        layout: data root.
        start_ds: day of every user's first event, ``YYYY-MM-DD``.

    Returns:
        Counts: events, days, users, items.
    """
    path = _require_file(Path(path), "sasrec")
    start = int(day_window(start_ds)[0].timestamp())
    users_l: list[int] = []
    items_l: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ContractError(f"{path}, line {lineno}: expected 'user item', got {line.strip()!r}")
            try:
                users_l.append(int(parts[0]))
                items_l.append(int(parts[1]))
            except ValueError as exc:
                raise ContractError(f"{path}, line {lineno}: user and item must be integers: {line.strip()!r}") from exc
    users = np.array(users_l, dtype=np.int64)
    items = np.array(items_l, dtype=np.int64)
    user_off = domain_offset("user_id", f"sasrec {path}", users)
    item_off = domain_offset("item_id", f"sasrec {path}", items)
    users, items = users + user_off, items + item_off
    # k = position of the line among the user's lines (stable sort keeps file order per user).
    order = np.argsort(users, kind="stable")
    su = users[order]
    new_user = np.concatenate([[True], su[1:] != su[:-1]]) if len(su) else np.array([], dtype=bool)
    group_start = np.maximum.accumulate(np.where(new_user, np.arange(len(su)), 0)) if len(su) else su
    k = np.empty(len(users), dtype=np.int64)
    k[order] = np.arange(len(su)) - group_start
    ts = start + 60 * k
    events = _events_table([f"sr-{i}" for i in range(len(users))], users, items, ["click"] * len(users), ts)
    item_ids = np.unique(items)
    items_table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "created_at": _ts_array(np.full(len(item_ids), start, dtype=np.int64)),
            "category": pa.nulls(len(item_ids), pa.string()),
            "content": pa.nulls(len(item_ids), pa.list_(pa.float32())),
        }
    )
    per_day = write_events_and_items(layout, events, items_table, source=f"sasrec {path}")
    out = _summary("sasrec", layout, per_day, events.column("action"), len(np.unique(users)), len(item_ids))
    out["id_offsets"] = {"user_id": user_off, "item_id": item_off}
    return out


# ------------------------------------------------------------------------- Taobao
def import_taobao(path: Path, layout: Layout) -> dict:
    """Import Taobao UserBehavior csv (no header: user_id,item_id,category_id,behavior,unix_ts).

    Actions: see :data:`TAOBAO_ACTIONS` (pv->click, fav->save, cart->share, buy->download).
    Items: ``category`` = category_id (as a string; the first one seen when an item has
    several), ``created_at`` = the item's first event, no content.

    Args:
        path: the csv file.
        layout: data root.

    Returns:
        Counts: events per action, days, users, items, and the source behaviour counts.
    """
    path = _require_file(Path(path), "taobao")
    users_l: list[int] = []
    items_l: list[int] = []
    cats: list[str] = []
    behaviors: list[str] = []
    ts_l: list[int] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != 5:
                raise ContractError(
                    f"{path}, line {lineno}: expected 5 columns user_id,item_id,category_id,behavior,unix_ts, "
                    f"got {len(row)}: {row!r}"
                )
            b = row[3].strip()
            if b not in TAOBAO_ACTIONS:
                raise ContractError(
                    f"{path}, line {lineno}: column 'behavior' has unknown value {b!r} (expected {list(TAOBAO_ACTIONS)})"
                )
            try:
                users_l.append(int(row[0]))
                items_l.append(int(row[1]))
                ts_l.append(int(row[4]))
            except ValueError as exc:
                raise ContractError(
                    f"{path}, line {lineno}: user_id, item_id and unix_ts must be integers: {row!r}"
                ) from exc
            cats.append(row[2].strip())
            behaviors.append(b)
    user_off = domain_offset("user_id", f"taobao {path}", users_l)
    item_off = domain_offset("item_id", f"taobao {path}", items_l)
    users = np.array(users_l, dtype=np.int64) + user_off
    items = np.array(items_l, dtype=np.int64) + item_off
    items_l = items.tolist()
    ts = np.array(ts_l, dtype=np.int64)
    events = _events_table(
        [f"tb-{i}" for i in range(len(users))], users, items, [TAOBAO_ACTIONS[b] for b in behaviors], ts
    )
    first = _first_seen(items, ts)
    category: dict[int, str] = {}
    for it, c in zip(items_l, cats, strict=True):
        category.setdefault(it, c)
    ids = sorted(first)
    items_table = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "created_at": _ts_array(np.array([first[i] for i in ids], dtype=np.int64)),
            "category": pa.array([category[i] or None for i in ids], pa.string()),
            "content": pa.nulls(len(ids), pa.list_(pa.float32())),
        }
    )
    per_day = write_events_and_items(layout, events, items_table, source=f"taobao {path}")
    out = _summary("taobao", layout, per_day, events.column("action"), len(np.unique(users)), len(ids))
    out["behaviors"] = {b: behaviors.count(b) for b in TAOBAO_ACTIONS}
    out["id_offsets"] = {"user_id": user_off, "item_id": item_off}
    return out
