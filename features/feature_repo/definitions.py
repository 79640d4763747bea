"""Feast objects of ActivityFM: entities, offline sources, feature views, feature services.

The offline sources are directories of parquet files under the data root's ``feast/``
directory (``Layout.feast``). Their paths here are relative: Feast resolves them against
the repo path, which :func:`features.store.feature_store` sets to ``Layout.feast``, so
the registry never holds a machine-specific path and one registry works for any
``AFM_HOME``.

Source layout (written by :mod:`features.store`)::

    sources/user_sequence/<ds>/part-*.parquet     one snapshot per day, event_timestamp = end of ds;
                                                  event_ts_s = each event's unix seconds
    sources/item_features/part-*.parquet          the item catalogue, event_timestamp = created_at
    sources/user_embedding/<model_version>/*.parquet  embeddings per model version
    sources/user_realtime_sequence/               the batch source behind the realtime push source (empty:
                                                  the realtime rows exist only online)

Each source has an ``event_timestamp`` column; point-in-time joins and materialization
use it.

Today's events reach the online store through the push source ``user_realtime_push``
(``POST /v1/events``, ``afm events push``): the feature view ``user_realtime_sequence``
holds, per user, the newest ``REALTIME_MAX_LEN`` explicit events pushed so far, with their
event ids and microsecond times. The service merges it with the daily ``user_sequence``
snapshot at ranking time (``serving.online_features``).
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bytes, Float32, Int64, String

from features.tables import MAX_SEQ_LEN

TIMESTAMP_FIELD = "event_timestamp"
#: Per-event times of ``user_sequence``: unix seconds, oldest first, one per item id. Plain
#: Array(Int64) (not Array(UnixTimestamp)): the ranker reads int seconds, and integers round-trip
#: every online store and the offline source without timezone or unit conversions.
EVENT_TS_FIELD = "event_ts_s"
#: Per-event times of ``user_realtime_sequence``: unix microseconds, aligned with ``item_ids``. A
#: request's sequence holds the events strictly before the request time at the microsecond, as
#: the training examples do, so the realtime rows keep the times to the microsecond.
REALTIME_TS_FIELD = "event_ts_us"
#: When the realtime row was written (unix microseconds): the next write of the user's row is
#: stamped later, so that an online store that keeps the newest row per key (Redis) takes it.
REALTIME_WRITTEN_FIELD = "written_us"
#: The push source that feeds today's events to the online store.
REALTIME_PUSH_SOURCE = "user_realtime_push"
#: Explicit events a realtime row keeps per user: the training cap, so that the merged sequence's
#: newest MAX_SEQ_LEN events are complete even for a user with that many events in a day.
REALTIME_MAX_LEN = MAX_SEQ_LEN

#: ``user_embedding``'s quantized embedding (bytes; null in float32 rows, whose ``embedding`` holds the floats).
QUANTIZED_EMBEDDING_FIELD = "embedding_q"

#: Source directories, relative to ``Layout.feast``.
USER_SEQUENCE_DIR = "sources/user_sequence"
ITEM_FEATURES_DIR = "sources/item_features"
USER_EMBEDDING_DIR = "sources/user_embedding"
USER_REALTIME_DIR = "sources/user_realtime_sequence"

#: How long a value stays valid for point-in-time joins and online reads.
#: A user_sequences snapshot is written every day for every user who ever acted.
SEQUENCE_TTL = timedelta(days=30)
EMBEDDING_TTL = timedelta(days=90)
#: The realtime rows only matter until the next daily snapshot covers their events.
REALTIME_TTL = timedelta(days=2)
NO_EXPIRY = timedelta(0)  # Feast: a zero ttl means values never expire

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A user of the platform.",
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="An item that can be shown and acted on.",
)

user_sequence_source = FileSource(
    name="user_sequence_source",
    path=USER_SEQUENCE_DIR,
    timestamp_field=TIMESTAMP_FIELD,
    description="Daily user_sequences snapshots (features/user_sequences/ds=…), stamped with the end of the day.",
)
item_features_source = FileSource(
    name="item_features_source",
    path=ITEM_FEATURES_DIR,
    timestamp_field=TIMESTAMP_FIELD,
    description="The item catalogue (raw/items/items.parquet), stamped with created_at.",
)
user_embedding_source = FileSource(
    name="user_embedding_source",
    path=USER_EMBEDDING_DIR,
    timestamp_field=TIMESTAMP_FIELD,
    description="User embeddings computed by a ranker version, stamped with the publish time.",
)

user_realtime_batch_source = FileSource(
    name="user_realtime_sequence_source",
    path=USER_REALTIME_DIR,
    timestamp_field=TIMESTAMP_FIELD,
    description="Batch source behind the realtime push source (nothing is written here: the rows live online).",
)
user_realtime_push = PushSource(
    name=REALTIME_PUSH_SOURCE,
    batch_source=user_realtime_batch_source,
    description="Today's explicit events per user, pushed by the scoring service's POST /v1/events.",
)

user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=SEQUENCE_TTL,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="item_ids", dtype=Array(Int64)),
        Field(name="actions", dtype=Array(String)),
        Field(name="surfaces", dtype=Array(String)),
        Field(name=EVENT_TS_FIELD, dtype=Array(Int64)),
        Field(name="n_events", dtype=Int64),
    ],
    source=user_sequence_source,
    online=True,
    description=(
        "The user's explicit-action sequence (oldest first) as of the end of the snapshot day; "
        f"{EVENT_TS_FIELD} holds each event's time in unix seconds, aligned with item_ids."
    ),
)

user_realtime_sequence = FeatureView(
    name="user_realtime_sequence",
    entities=[user],
    ttl=REALTIME_TTL,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="event_ids", dtype=Array(String)),
        Field(name="item_ids", dtype=Array(Int64)),
        Field(name="actions", dtype=Array(String)),
        Field(name="surfaces", dtype=Array(String)),
        Field(name=REALTIME_TS_FIELD, dtype=Array(Int64)),
        Field(name=REALTIME_WRITTEN_FIELD, dtype=Int64),
    ],
    source=user_realtime_push,
    online=True,
    description=(
        f"The user's newest explicit events pushed since the snapshots (oldest first, at most {REALTIME_MAX_LEN}), "
        f"ordered by (time, event id); {REALTIME_TS_FIELD} holds each event's unix microseconds."
    ),
)

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="item_id", dtype=Int64),
        Field(name="category", dtype=String),
        Field(name="content", dtype=Array(Float32)),
        Field(name="created_at_s", dtype=Int64),
    ],
    source=item_features_source,
    online=True,
    description="Item catalogue features: category, dense content vector, creation time (unix seconds).",
)

user_embedding = FeatureView(
    name="user_embedding",
    entities=[user],
    ttl=EMBEDDING_TTL,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="embedding", dtype=Array(Float32)),
        Field(name=QUANTIZED_EMBEDDING_FIELD, dtype=Bytes),
        Field(name="model_version", dtype=String),
    ],
    source=user_embedding_source,
    online=True,
    description=(
        "Precomputed user embedding and the ranker version that computed it (never mix versions): float32 in "
        f"embedding, or per-row quantized bytes in {QUANTIZED_EMBEDDING_FIELD} (features.store.encode_user_embeddings) "
        "for a version exported with quantized serving tables."
    ),
)

ranking_user = FeatureService(
    name="ranking_user",
    features=[user_sequence, user_realtime_sequence, user_embedding],
    description="What the scoring service reads for the requesting user.",
)
ranking_item = FeatureService(
    name="ranking_item",
    features=[item_features],
    description="What the scoring service reads for each candidate item.",
)

#: Everything `register` applies, in dependency order.
OBJECTS = [
    user,
    item,
    user_sequence_source,
    item_features_source,
    user_embedding_source,
    user_realtime_batch_source,
    user_realtime_push,
    user_sequence,
    user_realtime_sequence,
    item_features,
    user_embedding,
    ranking_user,
    ranking_item,
]
