"""Schemas of the tables the pipeline steps hand to each other (all parquet, under Layout).

Spark writes them, training and serving read them (pyarrow/pandas), Feast serves some.
Each ``*_SCHEMA`` is the column contract; a step that writes a table checks it against
these before it commits the partition.

All ``ts`` values are UTC timestamps. Sequences are stored oldest first, newest last,
ordered by (ts, event_id), and hold explicit actions only (no impressions).

- ``user_sequences/ds=D``: one row per user who has ever acted, the snapshot at the
  end of day D: the last ``MAX_SEQ_LEN`` explicit events.
- ``request_sequences/ds=D``: one row per ranking request of day D: the user's
  sequence strictly before the request time (the earliest impression of the request).
  Stored once per request, not once per impression.
- ``ranking_examples/ds=D``: one row per impression of day D, with 0/1 labels per
  action of ``LABEL_ACTIONS`` (the user did that action on that item in that request).
  Join to ``request_sequences`` on ``request_id`` for the sequence.
- ``pretrain_corpus/ds=D``: the D snapshot cut into segments of at most
  ``SEGMENT_LEN`` events (the last segment of a user is the newest).
- ``quarantine/events/ds=D``: the raw event columns plus ``reason`` (";"-joined reason codes).
"""

from __future__ import annotations

import pyarrow as pa

from features.contract import EVENT_SCHEMA, LABEL_ACTIONS

MAX_SEQ_LEN = 256
SEGMENT_LEN = 64

_TS = pa.timestamp("us", tz="UTC")

SEQUENCE_FIELDS = [
    pa.field("item_ids", pa.list_(pa.int64())),
    pa.field("actions", pa.list_(pa.string())),
    pa.field("surfaces", pa.list_(pa.string())),
    pa.field("ts", pa.list_(_TS)),
]

USER_SEQUENCES_SCHEMA = pa.schema(
    [pa.field("user_id", pa.int64()), *SEQUENCE_FIELDS, pa.field("last_ts", _TS), pa.field("n_events", pa.int64())]
)

REQUEST_SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.int64()),
        pa.field("request_ts", _TS),
        pa.field("surface", pa.string()),
        *SEQUENCE_FIELDS,
    ]
)

RANKING_EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("surface", pa.string()),
        pa.field("impression_ts", _TS),
        *[pa.field(f"label_{a}", pa.int32()) for a in LABEL_ACTIONS],
    ]
)

PRETRAIN_CORPUS_SCHEMA = pa.schema([pa.field("user_id", pa.int64()), pa.field("segment", pa.int32()), *SEQUENCE_FIELDS])

QUARANTINE_SCHEMA = pa.schema([*EVENT_SCHEMA, pa.field("reason", pa.string())])
