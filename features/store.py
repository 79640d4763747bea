"""The Feast feature store of ActivityFM: configuration, offline sources, registration, materialization.

Everything Feast keeps lives under ``Layout.feast`` (``$AFM_HOME/feast``)::

    registry.db                                   Feast registry (file)
    online.db                                     SQLite online store (default)
    sources/user_sequence/<ds>/part-*.parquet     offline source: one snapshot per day
    sources/item_features/part-*.parquet          offline source: the item catalogue
    sources/user_embedding/<version>/*.parquet    offline source: embeddings per model version

Feature consumers::

    from features.config import Layout
    from features.store import feature_store

    fs = feature_store(Layout.default())
    row = fs.get_online_features(
        features=["user_sequence:item_ids", "user_sequence:event_ts_s", "user_embedding:embedding"],
        entity_rows=[{"user_id": 42}],
    ).to_dict()

``user_sequence:event_ts_s`` holds each event's time in unix seconds, aligned with ``item_ids``
(``None`` for rows materialized before the field existed).

The online store is SQLite unless ``AFM_FEAST_ONLINE=redis``; then ``AFM_REDIS_URL``
(``host:port`` or ``redis://host:port``, default ``localhost:6379``) names the server.

The registry is the file ``registry.db`` unless ``AFM_FEAST_REGISTRY`` holds a SQLAlchemy URL:
then Feast's SQL registry in that database, which every process pointed at it shares (the
Spark driver, the Airflow tasks and the service replicas of a cluster), e.g.
``postgresql://feast:secret@pg.internal:5432/feast`` (read with the installed psycopg2 driver).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import importlib.util
import logging
import os
import re
import string
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from features.config import Layout, day_window, parse_ds
from features.spark import StagedPartition

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent / "feature_repo"
CONFIG_FILE = REPO_DIR / "feature_store.yaml"

#: The earliest time materialization looks at for views without a daily snapshot.
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

#: Input columns of a user_sequences snapshot that the Feast export reads.
USER_SEQUENCE_COLUMNS = ("user_id", "item_ids", "actions", "surfaces", "ts", "n_events")
ITEM_FEATURE_COLUMNS = ("item_id", "category", "content", "created_at_s")
USER_EMBEDDING_COLUMNS = ("user_id", "embedding", "model_version", "event_timestamp")

_TS = pa.timestamp("us", tz="UTC")
#: The user_embedding view's field of quantized embeddings (bytes of :func:`encode_user_embeddings`; null for
#: float32 rows, whose ``embedding`` holds the floats); a registry from before it lacks the field.
QUANTIZED_EMBEDDING_FIELD = "embedding_q"
USER_EMBEDDING_SOURCE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field(QUANTIZED_EMBEDDING_FIELD, pa.binary()),
        pa.field("model_version", pa.string()),
        pa.field("event_timestamp", _TS),
    ]
)


class FeatureStoreError(RuntimeError):
    """The Feast store is missing, not registered, or its inputs are wrong; the message says which."""


# --------------------------------------------------------------------------- config
def definitions() -> ModuleType:
    """The module holding the Feast objects (``features/feature_repo/definitions.py``)."""
    return importlib.import_module("features.feature_repo.definitions")


def _online_store_config(base: dict[str, Any]) -> dict[str, Any]:
    choice = os.environ.get("AFM_FEAST_ONLINE", "sqlite").strip().lower()
    if choice in ("", "sqlite"):
        return base
    if choice == "redis":
        url = os.environ.get("AFM_REDIS_URL", "localhost:6379").strip()
        url = re.sub(r"^rediss?://", "", url).rstrip("/")
        return {"type": "redis", "connection_string": url}
    raise FeatureStoreError(f"AFM_FEAST_ONLINE must be 'sqlite' or 'redis', got {choice!r}")


#: Environment variable naming the SQL registry (a SQLAlchemy URL); unset: the file under ``layout.feast``.
REGISTRY_ENV = "AFM_FEAST_REGISTRY"
#: Each process re-reads the registry after this many seconds (a registration elsewhere shows up within it).
REGISTRY_CACHE_TTL_S = 60
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def registry_url() -> str | None:
    """The SQL registry's SQLAlchemy URL from ``AFM_FEAST_REGISTRY``, or None for the local file.

    ``postgresql://``, ``postgres://`` and ``postgresql+psycopg2://`` all become
    ``postgresql+psycopg2://`` (the installed driver; Feast alone would turn a bare
    ``postgresql://`` into psycopg 3's ``postgresql+psycopg://``). ``postgresql+psycopg://``
    is kept when psycopg 3 is installed; ``sqlite:///path`` serves one machine (tests).

    Raises:
        FeatureStoreError: for any other scheme, or psycopg 3 asked for but not installed.
    """
    url = os.environ.get(REGISTRY_ENV, "").strip()
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in _PG_SCHEMES:
        return f"postgresql+psycopg2://{rest}"
    if sep and scheme == "postgresql+psycopg":
        if importlib.util.find_spec("psycopg") is None:
            raise FeatureStoreError(
                f"{REGISTRY_ENV} asks for psycopg 3 (postgresql+psycopg://), which is not installed: "
                "use postgresql:// (psycopg2)"
            )
        return url
    if sep and scheme == "sqlite":
        return url
    raise FeatureStoreError(
        f"{REGISTRY_ENV} must be a SQLAlchemy URL of PostgreSQL (postgresql://user:password@host:5432/db) "
        f"or SQLite (sqlite:////path/registry.sqlite), got " + (f"scheme {scheme!r}" if sep else "no scheme://")
    )


def _redacted(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def registry_location(layout: Layout) -> str:
    """Where the registry of ``layout`` lives: the file's path, or the SQL registry's URL (password masked)."""
    url = registry_url()
    return str(Path(layout.feast) / "registry.db") if url is None else _redacted(url)


def _engine_kwargs(url: str) -> dict[str, Any]:
    """``create_engine`` arguments of the SQL registry: check pooled connections (a pod outlives DB restarts)."""
    kwargs: dict[str, Any] = {"echo": False, "pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def _registry_config(base: dict[str, Any]) -> dict[str, Any]:
    url = registry_url()
    if url is None:
        return base
    return {
        "registry_type": "sql",
        "path": url,
        "cache_ttl_seconds": int(base.get("cache_ttl_seconds", REGISTRY_CACHE_TTL_S)),
        "sqlalchemy_config_kwargs": _engine_kwargs(url),
    }


def repo_config(layout: Layout) -> Any:
    """The Feast ``RepoConfig`` for ``layout``: feature_store.yaml with ``${AFM_FEAST_DIR}`` = ``layout.feast``.

    Args:
        layout: The data root; the registry, online store and offline sources live under ``layout.feast``.

    Returns:
        A ``feast.RepoConfig`` whose repo path is ``layout.feast`` (so relative source paths resolve there).
    """
    from feast import RepoConfig

    feast_dir = Path(layout.feast).resolve()
    text = string.Template(CONFIG_FILE.read_text()).safe_substitute({**os.environ, "AFM_FEAST_DIR": str(feast_dir)})
    raw = yaml.safe_load(text)
    raw["online_store"] = _online_store_config(raw.get("online_store") or {})
    raw["registry"] = _registry_config(raw.get("registry") or {})
    config = RepoConfig(**raw)
    config.repo_path = feast_dir
    return config


def feature_store(layout: Layout) -> FeatureStore:
    """A Feast ``FeatureStore`` over ``layout.feast``; works from any working directory.

    Args:
        layout: The data root (``Layout.default()`` reads ``AFM_HOME``, default ``./var``).

    Returns:
        The feature store. Call :func:`register` once before reading from it.
    """
    from feast import FeatureStore

    feast_dir = Path(layout.feast).resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(feast_dir), config=repo_config(layout))


#: (SQL registry URL, project) pairs seen registered: a registration is never undone, so not asked again.
_REGISTERED_SQL: set[tuple[str, str]] = set()


@functools.cache
def _registry_engine(url: str) -> Any:
    from sqlalchemy import create_engine

    return create_engine(url, **_engine_kwargs(url))


def is_registered(layout: Layout) -> bool:
    """Whether ``register`` has run: the registry file under ``layout.feast``, or the project's views in the SQL registry.

    Raises:
        FeatureStoreError: when the SQL registry cannot be reached.
    """
    url = registry_url()
    if url is None:
        return (Path(layout.feast) / "registry.db").exists()
    project = str(yaml.safe_load(CONFIG_FILE.read_text())["project"])
    if (url, project) in _REGISTERED_SQL:
        return True
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import SQLAlchemyError

    query = text("SELECT 1 FROM feature_views WHERE project_id = :p LIMIT 1")
    try:
        with _registry_engine(url).connect() as conn:
            found = inspect(conn).has_table("feature_views") and conn.execute(query, {"p": project}).first() is not None
    except SQLAlchemyError as exc:
        raise FeatureStoreError(
            f"the Feast SQL registry at {_redacted(url)} cannot be read: {type(exc).__name__}: {getattr(exc, 'orig', None) or exc}"
        ) from exc
    if found:
        _REGISTERED_SQL.add((url, project))
    return found


# --------------------------------------------------------------------------- export
def _source_dir(layout: Layout, relative: str) -> Path:
    return Path(layout.feast) / relative


def _require_columns(have: list[str], need: tuple[str, ...], where: str) -> None:
    missing = [c for c in need if c not in have]
    if missing:
        raise FeatureStoreError(f"{where}: missing columns {missing} (have {sorted(have)})")


def snapshot_timestamp(ds: str) -> dt.datetime:
    """The event timestamp of the ``ds`` snapshot: the last microsecond of the UTC day.

    Args:
        ds: Partition day, ``YYYY-MM-DD``.

    Returns:
        ``ds`` 23:59:59.999999 UTC: every event of the day is at or before it.
    """
    return day_window(ds)[1] - dt.timedelta(microseconds=1)


def _sequence_source(seq: DataFrame, snap_ts: dt.datetime) -> DataFrame:
    """The ``user_sequence`` offline source rows of one snapshot (event times as unix seconds)."""
    from pyspark.sql import functions as F

    from features.feature_repo import definitions as defs

    return seq.select(
        F.col("user_id").cast("bigint").alias("user_id"),
        F.col("item_ids").cast("array<bigint>").alias("item_ids"),
        F.col("actions").cast("array<string>").alias("actions"),
        F.col("surfaces").cast("array<string>").alias("surfaces"),
        # per-event times as unix seconds (what the ranker's time gaps read), aligned with item_ids
        F.transform("ts", lambda t: F.unix_seconds(t)).cast("array<bigint>").alias(defs.EVENT_TS_FIELD),
        F.col("n_events").cast("bigint").alias("n_events"),
        # Spark timestamps are instants; a microsecond literal avoids any session-timezone shift.
        F.timestamp_micros(F.lit(int(snap_ts.timestamp()) * 1_000_000 + snap_ts.microsecond)).alias(
            defs.TIMESTAMP_FIELD
        ),
    )


def _item_source(items: DataFrame) -> DataFrame:
    """The ``item_features`` offline source rows of the catalogue."""
    from pyspark.sql import functions as F

    from features.feature_repo import definitions as defs

    return items.select(
        F.col("item_id").cast("bigint").alias("item_id"),
        F.col("category").cast("string").alias("category"),
        F.col("content").cast("array<float>").alias("content"),
        F.unix_seconds(F.col("created_at")).alias("created_at_s"),
        F.col("created_at").alias(defs.TIMESTAMP_FIELD),
    )


def export_feast_sources(spark: SparkSession, layout: Layout, ds: str) -> dict:
    """Write the ``ds`` user-sequence snapshot and the item catalogue as Feast offline sources.

    Reads ``layout.user_sequences/ds=<ds>`` (``features.tables.USER_SEQUENCES_SCHEMA``) and
    ``layout.items`` (``features.contract.ITEM_SCHEMA``), writes parquet part files under
    ``layout.feast/sources``. The sequence's ``ts`` list becomes ``event_ts_s``: unix seconds
    of every event, oldest first, aligned with ``item_ids``. Rerunning a day replaces that
    day's sequence rows; the item source is the whole catalogue and is replaced each time.

    Args:
        spark: An active Spark session.
        layout: The data root.
        ds: The snapshot day, ``YYYY-MM-DD``.

    Returns:
        ``{"ds", "event_timestamp", "user_sequence_rows", "item_rows", "paths"}``.

    Raises:
        FeatureStoreError: when an input is missing or lacks columns.
    """

    from features.feature_repo import definitions as defs

    parse_ds(ds)
    seq_in = layout.partition(layout.user_sequences, ds)
    if not seq_in.exists():
        raise FeatureStoreError(f"no user_sequences snapshot for ds={ds} at {seq_in}; run `afm features sequences`")
    items_in = Path(layout.items)
    if not items_in.exists() or not any(items_in.glob("*.parquet")):
        raise FeatureStoreError(f"no item catalogue at {items_in} (expected items.parquet)")

    snap_ts = snapshot_timestamp(ds)
    seq = spark.read.parquet(str(seq_in))
    _require_columns(seq.columns, USER_SEQUENCE_COLUMNS, f"user_sequences ds={ds}")
    seq_out = _sequence_source(seq, snap_ts)
    items = spark.read.parquet(*[str(p) for p in sorted(items_in.glob("*.parquet"))])
    _require_columns(items.columns, ("item_id", "created_at", "category", "content"), f"items at {items_in}")
    items_out = _item_source(items)

    seq_dir = _source_dir(layout, defs.USER_SEQUENCE_DIR) / ds
    item_dir = _source_dir(layout, defs.ITEM_FEATURES_DIR)
    conf_key = "spark.sql.parquet.outputTimestampType"
    previous = spark.conf.get(conf_key, None)
    spark.conf.set(conf_key, "TIMESTAMP_MICROS")  # INT96 would lose the UTC marker for pandas/dask
    try:
        counts = {}
        staged = []  # both sources are written aside first; either both are published or neither
        for df, final, name in ((seq_out, seq_dir, "user_sequence_rows"), (items_out, item_dir, "item_rows")):
            out = StagedPartition.beside(final)
            df.write.mode("overwrite").parquet(str(out.staged))
            counts[name] = pq.ParquetDataset(str(out.staged)).read(columns=[df.columns[0]]).num_rows
            staged.append(out)
        for out in staged:
            out.publish()
    finally:
        if previous is None:
            spark.conf.unset(conf_key)
        else:
            spark.conf.set(conf_key, previous)

    summary = {
        "ds": ds,
        "event_timestamp": snap_ts.isoformat(),
        **counts,
        "paths": {"user_sequence": str(seq_dir), "item_features": str(item_dir)},
    }
    log.info("feast sources for ds=%s: %s", ds, summary)
    return summary


# --------------------------------------------------------------------- registration
def register(layout: Layout) -> dict:
    """Apply the Feast definitions (entities, sources, views, services) to the registry; idempotent.

    Args:
        layout: The data root; the registry is ``layout.feast/registry.db`` or ``AFM_FEAST_REGISTRY``'s database.

    Returns:
        ``{"project", "registry", "entities", "feature_views", "feature_services"}``.
    """
    defs = definitions()
    fs = feature_store(layout)
    fs.apply(list(defs.OBJECTS))
    summary = {
        "project": fs.project,
        "registry": registry_location(layout),
        "entities": sorted(e.name for e in fs.list_entities()),
        "feature_views": sorted(v.name for v in fs.list_feature_views()),
        "feature_services": sorted(s.name for s in fs.list_feature_services()),
    }
    log.info("feast registry: %s", summary)
    return summary


def _require_registered(layout: Layout) -> None:
    if not is_registered(layout):
        raise FeatureStoreError(f"no Feast registry at {registry_location(layout)}; run `afm features register` first")


# ---------------------------------------------------------------- materialization
def _source_rows(path: Path, key: str, start: dt.datetime, end: dt.datetime) -> int:
    """Distinct ``key`` values of a source directory whose event_timestamp is in [start, end]."""
    if not path.exists() or not any(path.rglob("*.parquet")):
        return 0
    data = pads.dataset(str(path), format="parquet", partitioning=None)
    ts = pads.field("event_timestamp")
    table = data.to_table(columns=[key], filter=(ts >= pa.scalar(start, _TS)) & (ts <= pa.scalar(end, _TS)))
    return len(table.column(key).unique())


def _latest_sequence_day(layout: Layout, end: dt.datetime) -> str | None:
    from features.feature_repo import definitions as defs

    root = _source_dir(layout, defs.USER_SEQUENCE_DIR)
    if not root.exists():
        return None
    days = []
    for p in root.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            day = parse_ds(p.name)
        except ValueError:
            continue
        if snapshot_timestamp(day.isoformat()) <= end:
            days.append(day.isoformat())
    return max(days) if days else None


def _check_sequence_sources(layout: Layout) -> None:
    """Raise when a ``user_sequence`` source day lacks a column of the feature view.

    Feast reads every day directory of the source at once, so a day exported before a field
    was added (e.g. ``event_ts_s``) breaks materialization and point-in-time reads of all days.
    """
    from features.feature_repo import definitions as defs

    root = _source_dir(layout, defs.USER_SEQUENCE_DIR)
    if not root.exists():
        return
    need = [f.name for f in defs.user_sequence.schema]
    stale: dict[str, list[str]] = {}
    for day in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        part = next(iter(sorted(day.rglob("*.parquet"))), None)
        if part is None:
            continue
        have = set(pq.read_schema(part).names)
        missing = [c for c in need if c not in have]
        if missing:
            stale[day.name] = missing
    if stale:
        days = sorted(stale)
        raise FeatureStoreError(
            f"user_sequence sources of days {days} lack columns {sorted({c for m in stale.values() for c in m})} "
            f"(exported before those fields existed); re-export them with `afm features feast-export --ds <day>` "
            f"or delete {root}/<day>"
        )


def materialize(layout: Layout, end_ds: str | None = None) -> dict:
    """Load the latest feature values up to the end of ``end_ds`` (or now) into the online store.

    ``user_sequence`` is loaded from the newest snapshot day at or before the end (a
    snapshot holds every user), ``item_features`` and ``user_embedding`` from all rows up to
    the end (latest per entity wins).

    Args:
        layout: The data root.
        end_ds: Last day to include, ``YYYY-MM-DD``; default: now (UTC).

    Returns:
        ``{"end", "views": {view: {"start", "rows"}}}`` where ``rows`` counts the entities loaded.
    """
    from features.feature_repo import definitions as defs

    _require_registered(layout)
    _check_sequence_sources(layout)
    end = day_window(end_ds)[1] if end_ds is not None else dt.datetime.now(dt.UTC)
    fs = feature_store(layout)
    views: dict[str, dict] = {}

    seq_day = _latest_sequence_day(layout, end)
    plan: list[tuple[str, dt.datetime | None, Path, str]] = [
        (
            "user_sequence",
            day_window(seq_day)[0] if seq_day else None,
            _source_dir(layout, defs.USER_SEQUENCE_DIR),
            "user_id",
        ),
        ("item_features", EPOCH, _source_dir(layout, defs.ITEM_FEATURES_DIR), "item_id"),
        ("user_embedding", EPOCH, _source_dir(layout, defs.USER_EMBEDDING_DIR), "user_id"),
    ]
    upgrade_user_embedding_sources(layout)  # folders of versions published before embedding_q
    for name, start, path, key in plan:
        rows = _source_rows(path, key, start, end) if start is not None else 0
        if rows:
            fs.materialize(start_date=start, end_date=end, feature_views=[name])
        views[name] = {"start": start.isoformat() if start else None, "rows": rows}
    summary = {"end": end.isoformat(), "views": views}
    log.info("feast materialize: %s", summary)
    return summary


# ------------------------------------------------------------------ training sets
ROW_ID = "_afm_row"


def historical_features(layout: Layout, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Point-in-time feature values for every row of ``entity_df``, in its order.

    A thin wrapper around ``FeatureStore.get_historical_features``: Feast's file offline
    store drops an entity row when the entity has only rows newer than the row's timestamp;
    here every input row comes back once, with nulls where no value was valid at its time.

    Args:
        layout: The data root.
        entity_df: Join keys (``user_id`` and/or ``item_id``) and ``event_timestamp`` (UTC),
            plus any other columns to carry along.
        features: Feature references, e.g. ``["user_sequence:item_ids", "item_features:content"]``.

    Returns:
        ``entity_df``'s columns plus one column per feature, one row per input row.
    """
    import pandas as pd

    if "event_timestamp" not in entity_df.columns:
        raise FeatureStoreError("entity_df needs an event_timestamp column (UTC) for the point-in-time join")
    _require_registered(layout)
    if any(ref.startswith("user_sequence:") for ref in features):
        _check_sequence_sources(layout)
    base = entity_df.reset_index(drop=True).copy()
    base["event_timestamp"] = pd.to_datetime(base["event_timestamp"], utc=True)
    base[ROW_ID] = range(len(base))
    got = feature_store(layout).get_historical_features(entity_df=base, features=list(features)).to_df()
    names = [ref.split(":", 1)[1] for ref in features]
    names = [n for n in names if n in got.columns]
    out = base.merge(got[[ROW_ID, *names]], on=ROW_ID, how="left", validate="one_to_one")
    return out.sort_values(ROW_ID).drop(columns=[ROW_ID]).reset_index(drop=True)


# ------------------------------------------------------------------ user embeddings
def _safe_version(version: str) -> str:
    if not version or not re.fullmatch(r"[A-Za-z0-9._+-]+", version) or version.startswith("."):
        raise FeatureStoreError(f"model_version {version!r} must be non-empty and use only letters, digits, . _ + -")
    return version


#: Header of a quantized user embedding: bits (uint8), width D (uint16), little-endian.
_Q_HEADER = struct.Struct("<BH")
_Q_LEVELS = {8: 127, 4: 15}


def encode_user_embeddings(matrix: np.ndarray, bits: int) -> list[bytes]:
    """Per-row quantized user embeddings, one compact ``bytes`` value per row (what ``embedding_q`` holds).

    The rows use :mod:`training.model.quantize`'s formats: int8 is symmetric (scale =
    max|row| / 127, codes in [-127, 127]); int4 is asymmetric (offset = min(row), scale =
    (max - min) / 15, codes in [0, 15], two per byte, the even column in the low nibble).
    A value is the header (bits: uint8, D: uint16), the float32 scale, for int4 the float32
    offset, then the codes: 3 + 4 + D bytes for int8, 3 + 8 + ceil(D / 2) for int4 (D = 64:
    71 and 43 bytes, against 256 for the float32 list).

    Args:
        matrix: (N, D) float embeddings.
        bits: 8 or 4.

    Returns:
        N byte strings; :func:`decode_user_embedding` reads one back to within half a step
        (scale / 2) of each value.

    Example:
        >>> decode_user_embedding(encode_user_embeddings(np.array([[0.5, -1.0]]), 8)[0]).tolist()
        [0.5039370059967041, -1.0]
    """
    if bits not in _Q_LEVELS:
        raise FeatureStoreError(f"user embeddings: quantization bits must be 8 or 4, got {bits!r}")
    w = np.asarray(matrix, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] >= 1 << 16:
        raise FeatureStoreError(f"user embeddings: expected a (N, D < 65536) matrix, got shape {w.shape}")
    n, d = w.shape
    levels = np.float32(_Q_LEVELS[bits])
    if bits == 8:
        scale = np.abs(w).max(axis=1, initial=0.0) / levels  # (N,)
        safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        codes = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)  # (N, D)
        parts = [scale.astype("<f4")[:, None].view(np.uint8), codes.view(np.uint8)]  # (N, 4), (N, D)
    else:
        lo = w.min(axis=1, initial=np.inf) if d else np.zeros(n, np.float32)  # (N,)
        scale = ((w.max(axis=1, initial=-np.inf) - lo) / levels if d else lo).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        codes = np.clip(np.rint((w - lo[:, None]) / safe[:, None]), 0, 15).astype(np.uint8)  # (N, D)
        if d % 2:
            codes = np.concatenate([codes, np.zeros((n, 1), np.uint8)], axis=1)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, ceil(D / 2))
        parts = [scale.astype("<f4")[:, None].view(np.uint8), lo.astype("<f4")[:, None].view(np.uint8), packed]
    body = np.concatenate(parts, axis=1)  # (N, bytes per row)
    header = _Q_HEADER.pack(bits, d)
    return [header + row.tobytes() for row in body]


def decode_user_embedding(payload: bytes) -> np.ndarray:
    """(D,) float32 embedding of one value of :func:`encode_user_embeddings`.

    Raises:
        FeatureStoreError: a value that is not such an encoding (unknown bits, wrong length).
    """
    if len(payload) < _Q_HEADER.size:
        raise FeatureStoreError(f"quantized user embedding of {len(payload)} bytes has no header")
    bits, d = _Q_HEADER.unpack_from(payload)
    floats = {8: 1, 4: 2}.get(bits)
    if floats is None:
        raise FeatureStoreError(f"quantized user embedding has {bits} bits; expected 8 or 4")
    code_bytes = d if bits == 8 else (d + 1) // 2
    if len(payload) != _Q_HEADER.size + 4 * floats + code_bytes:
        raise FeatureStoreError(
            f"quantized user embedding of {len(payload)} bytes; {bits}-bit D={d} needs "
            f"{_Q_HEADER.size + 4 * floats + code_bytes}"
        )
    head = np.frombuffer(payload, "<f4", count=floats, offset=_Q_HEADER.size)
    raw = np.frombuffer(payload, np.uint8, offset=_Q_HEADER.size + 4 * floats)
    if bits == 8:
        return raw.view(np.int8).astype(np.float32) * head[0]
    codes = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:d]  # (D,)
    return (codes.astype(np.float32) * head[0] + head[1]).astype(np.float32)


def stored_user_embedding(
    fs: FeatureStore, got: dict[str, list], user_id: int
) -> tuple[list[float] | None, str | None]:
    """The user's stored embedding and its model version from an online read (full feature names), or (None, None).

    A float32 row carries ``user_embedding__embedding``. A quantized row (published for an
    exported model, ``embedding`` null) carries ``embedding_q``, decoded here
    (:func:`decode_user_embedding`); when the read did not request that field, it is read for
    this user, if the registry's view has it (a registry from before it has float rows only).

    Args:
        fs: the feature store the read came from.
        got: ``get_online_features(..., full_feature_names=True).to_dict()`` of one entity row.
        user_id: the user of that row.
    """
    floats = (got.get("user_embedding__embedding") or [None])[0]
    version = (got.get("user_embedding__model_version") or [None])[0]
    if floats is not None and len(floats):
        return list(floats), version
    key = f"user_embedding__{QUANTIZED_EMBEDDING_FIELD}"
    if key in got:
        payload = got[key][0]
    elif version is not None and _has_quantized_field(fs):
        payload = fs.get_online_features(
            features=[f"user_embedding:{QUANTIZED_EMBEDDING_FIELD}"],
            entity_rows=[{"user_id": int(user_id)}],
            full_feature_names=True,
        ).to_dict()[key][0]
    else:
        payload = None
    if not payload:
        return None, None
    return decode_user_embedding(bytes(payload)).tolist(), version


def _has_quantized_field(fs: FeatureStore) -> bool:
    """Whether the registry's user_embedding view has the quantized field (read from Feast's registry cache)."""
    view = fs.get_feature_view("user_embedding", allow_registry_cache=True)
    return QUANTIZED_EMBEDDING_FIELD in {f.name for f in view.features}


def upgrade_user_embedding_sources(layout: Layout) -> list[str]:
    """Add a null ``embedding_q`` column to the user_embedding source folders written before it existed.

    Feast reads every version folder of the source as one dataset, whose columns are those of
    its first file: a folder without the column next to one with it fails materialization of
    the view. The rewrite keeps every row and value (the float rows' ``embedding_q`` is null
    anyway) and swaps each folder in whole.

    Returns:
        The model versions whose folders were rewritten.
    """
    from features.feature_repo import definitions as defs

    root = _source_dir(layout, defs.USER_EMBEDDING_DIR)
    if not root.exists():
        return []
    upgraded = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        files = sorted(folder.glob("*.parquet"))
        if not files or all(QUANTIZED_EMBEDDING_FIELD in pq.read_schema(f).names for f in files):
            continue
        out = StagedPartition.beside(folder)
        out.staged.mkdir(parents=True)
        for f in files:
            table = pq.read_table(f)
            if QUANTIZED_EMBEDDING_FIELD not in table.column_names:
                table = table.append_column(
                    pa.field(QUANTIZED_EMBEDDING_FIELD, pa.binary()), pa.nulls(table.num_rows, pa.binary())
                )
            names = [n for n in USER_EMBEDDING_SOURCE_SCHEMA.names if n in table.column_names]
            pq.write_table(table.select(names), out.staged / f.name)
        out.publish()
        upgraded.append(folder.name)
    if upgraded:
        log.info("user_embedding sources: added a null %s column to %s", QUANTIZED_EMBEDDING_FIELD, upgraded)
    return upgraded


def write_user_embeddings(layout: Layout, df: pd.DataFrame, bits: int | None = None) -> None:
    """Write user embeddings to the offline source and materialize them into the online store.

    Rows of one model version replace that version's earlier rows in the offline source;
    the online store then holds each user's newest embedding (by ``event_timestamp``).
    With ``bits`` the rows are stored quantized (``embedding_q``, :func:`encode_user_embeddings`;
    ``embedding`` null), else as float32 lists (``embedding_q`` null); every file has both columns.

    Args:
        layout: The data root.
        df: Columns ``user_id`` (int), ``embedding`` (sequence of floats, one length for all
            rows), ``model_version`` (str), ``event_timestamp`` (UTC datetime).
        bits: 8 or 4 to store the embeddings per-row quantized; None for float32.

    Raises:
        FeatureStoreError: on missing columns, mixed embedding lengths, bad versions, or no
            registry; with ``bits``, a registry whose view lacks ``embedding_q``.
    """
    import pandas as pd

    from features.feature_repo import definitions as defs

    _require_registered(layout)
    if bits is not None and not _has_quantized_field(feature_store(layout)):
        raise FeatureStoreError(
            f"the Feast registry at {registry_location(layout)} has no user_embedding:{QUANTIZED_EMBEDDING_FIELD} "
            "field for quantized user embeddings; run `afm features register`"
        )
    _require_columns(list(df.columns), USER_EMBEDDING_COLUMNS, "user embeddings")
    if df.empty:
        raise FeatureStoreError("user embeddings: the DataFrame has no rows")
    frame = df.loc[:, list(USER_EMBEDDING_COLUMNS)].copy()
    if frame["user_id"].isna().any() or frame["embedding"].isna().any():
        raise FeatureStoreError("user embeddings: user_id and embedding must not be null")
    lengths = {len(e) for e in frame["embedding"]}
    if len(lengths) != 1:
        raise FeatureStoreError(f"user embeddings: rows have different embedding lengths {sorted(lengths)}")
    ts = pd.to_datetime(frame["event_timestamp"], utc=True)
    if ts.isna().any():
        raise FeatureStoreError("user embeddings: event_timestamp must not be null")
    frame["event_timestamp"] = ts
    matrix = np.stack([np.asarray(e, dtype=np.float32) for e in frame["embedding"]])  # (N, D)
    frame["_row"] = np.arange(len(frame))

    root = _source_dir(layout, defs.USER_EMBEDDING_DIR)
    for version, part in frame.groupby("model_version", sort=True):
        out = StagedPartition.beside(root / _safe_version(str(version)))
        out.staged.mkdir(parents=True)
        rows = matrix[part["_row"].to_numpy()]  # (n, D)
        n, d = rows.shape
        if bits is None:
            embedding = pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), pa.array(rows.ravel())
            )
            quantized = pa.nulls(n, pa.binary())
        else:
            embedding = pa.nulls(n, pa.list_(pa.float32()))
            quantized = pa.array(encode_user_embeddings(rows, bits), pa.binary())
        table = pa.Table.from_arrays(
            [
                pa.array(part["user_id"].to_numpy(dtype=np.int64)),
                embedding,
                quantized,
                pa.array([str(version)] * n, pa.string()),
                pa.array(part["event_timestamp"].dt.as_unit("us"), _TS),
            ],
            schema=USER_EMBEDDING_SOURCE_SCHEMA,
        )
        pq.write_table(table, out.staged / "part-0.parquet")
        out.publish()
    upgrade_user_embedding_sources(layout)  # folders of versions published before embedding_q

    start = ts.min().to_pydatetime()
    end = ts.max().to_pydatetime() + dt.timedelta(microseconds=1)
    t0 = time.perf_counter()
    feature_store(layout).materialize(start_date=start, end_date=end, feature_views=["user_embedding"])
    log.info("materialized %d user embeddings in %.1fs", len(frame), time.perf_counter() - t0)


# ------------------------------------------------------------------ realtime events
REALTIME_VIEW = "user_realtime_sequence"
#: The list fields of a realtime row, aligned event by event (oldest first).
REALTIME_LIST_FIELDS = ("event_ids", "item_ids", "actions", "surfaces", "event_ts_us")


@dataclass(frozen=True)
class RealtimeSequence:
    """One user's ``user_realtime_sequence`` row: explicit events pushed since the snapshots.

    Events are oldest first, ordered by ``(ts_us, event_id)`` (the training sequences' order),
    one per event id, at most ``definitions.REALTIME_MAX_LEN``. ``written_us`` is when the row was
    pushed (unix microseconds; 0 = never).
    """

    event_ids: tuple[str, ...] = ()
    item_ids: tuple[int, ...] = ()
    actions: tuple[str, ...] = ()
    surfaces: tuple[str, ...] = ()
    ts_us: tuple[int, ...] = ()
    written_us: int = 0

    def __len__(self) -> int:
        return len(self.event_ids)

    def events(self) -> list[tuple[int, str, int, str, str]]:
        """``(ts_us, event_id, item_id, action, surface)`` per event, oldest first."""
        return list(zip(self.ts_us, self.event_ids, self.item_ids, self.actions, self.surfaces, strict=True))

    @classmethod
    def of(cls, events: Iterable[tuple[int, str, int, str, str]], written_us: int = 0) -> RealtimeSequence:
        """A row from ``(ts_us, event_id, item_id, action, surface)`` tuples, kept in the order given."""
        rows = list(events)
        return cls(
            event_ids=tuple(r[1] for r in rows),
            item_ids=tuple(int(r[2]) for r in rows),
            actions=tuple(r[3] for r in rows),
            surfaces=tuple(r[4] for r in rows),
            ts_us=tuple(int(r[0]) for r in rows),
            written_us=written_us,
        )

    def merged(self, new: Iterable[tuple[int, str, int, str, str]], max_len: int) -> tuple[RealtimeSequence, list[str]]:
        """This row with ``new`` events added: deduplicated by event id, ordered by (time, event id), the newest ``max_len``.

        An event id already in the row (or earlier in ``new``) keeps its first copy.

        Returns:
            ``(row, duplicates)``: the merged row (``written_us`` unchanged) and the event ids of ``new`` that were
            already there.
        """
        seen = set(self.event_ids)
        events = self.events()
        duplicates = []
        for ev in new:
            if ev[1] in seen:
                duplicates.append(ev[1])
                continue
            seen.add(ev[1])
            events.append(ev)
        events.sort(key=lambda e: (e[0], e[1]))
        return RealtimeSequence.of(events[-max_len:] if max_len > 0 else [], self.written_us), duplicates


def realtime_features() -> list[str]:
    """Feature references of the realtime view (read them with ``full_feature_names=True``: names overlap user_sequence's)."""
    from features.feature_repo import definitions as defs

    return [f"{REALTIME_VIEW}:{f.name}" for f in defs.user_realtime_sequence.schema if f.name != "user_id"]


def realtime_row(got: dict[str, list], i: int) -> RealtimeSequence | None:
    """Row ``i`` of a ``get_online_features(realtime_features(), full_feature_names=True).to_dict()``; None when absent."""
    from features.feature_repo import definitions as defs

    def col(name: str) -> Any:
        return (got.get(f"{REALTIME_VIEW}__{name}") or [None] * (i + 1))[i]

    if col("event_ids") is None:
        return None
    lists = [list(col(name) or []) for name in REALTIME_LIST_FIELDS]
    if len({len(x) for x in lists}) != 1:
        raise FeatureStoreError(f"{REALTIME_VIEW}: row {i} has lists of different lengths {[len(x) for x in lists]}")
    ids, items, actions, surfaces, ts = lists
    return RealtimeSequence(
        tuple(ids),
        tuple(int(x) for x in items),
        tuple(actions),
        tuple(surfaces),
        tuple(int(x) for x in ts),
        int(col(defs.REALTIME_WRITTEN_FIELD) or 0),
    )


def read_realtime_sequences(fs: FeatureStore, user_ids: Sequence[int]) -> dict[int, RealtimeSequence]:
    """The stored realtime rows of ``user_ids`` (users without one are left out)."""
    if not user_ids:
        return {}
    got = fs.get_online_features(
        features=realtime_features(), entity_rows=[{"user_id": int(u)} for u in user_ids], full_feature_names=True
    ).to_dict()
    rows = {int(u): realtime_row(got, i) for i, u in enumerate(user_ids)}
    return {u: r for u, r in rows.items() if r is not None}


def push_realtime_sequences(fs: FeatureStore, rows: dict[int, RealtimeSequence]) -> int:
    """Write users' realtime rows to the online store through the push source; each replaces the user's row.

    A row is stamped with its ``written_us`` (an online store that keeps the newest row per user, as
    Redis does, drops a row not newer than the stored one: the caller stamps each write later than the
    last).

    Returns:
        The number of rows pushed.
    """
    import pandas as pd

    from features.feature_repo import definitions as defs

    if not rows:
        return 0
    users = sorted(rows)
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="int64"),
            "event_ids": [list(rows[u].event_ids) for u in users],
            "item_ids": [[int(x) for x in rows[u].item_ids] for u in users],
            "actions": [list(rows[u].actions) for u in users],
            "surfaces": [list(rows[u].surfaces) for u in users],
            defs.REALTIME_TS_FIELD: [[int(x) for x in rows[u].ts_us] for u in users],
            defs.REALTIME_WRITTEN_FIELD: pd.Series([rows[u].written_us for u in users], dtype="int64"),
            defs.TIMESTAMP_FIELD: pd.to_datetime([rows[u].written_us for u in users], unit="us", utc=True),
        }
    )
    fs.push(defs.REALTIME_PUSH_SOURCE, frame)
    return len(users)
