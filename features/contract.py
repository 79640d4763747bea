"""The event contract: what every raw activity record and item record looks like.

One place defines the columns, their types and the vocabularies. The Spark gate,
the Great Expectations suites, the generators/importers and the models all read them
from here, so a change to the contract is one edit.

Raw events (parquet, partitioned by ``ds=YYYY-MM-DD``)::

    event_id    string   unique over all events
    user_id     int64    in the id domain [MIN_ID, MAX_ID]
    item_id     int64    in the id domain [MIN_ID, MAX_ID]
    action      string   one of ACTIONS ("impression" = shown; every other = explicit)
    surface     string   one of SURFACES
    ts          timestamp (UTC), inside the partition's day
    request_id  string   nullable: the ranking request that showed the item
    dwell_ms    int64    nullable

Items (parquet, one file)::

    item_id     int64
    created_at  timestamp (UTC)
    category    string
    content     array<float32>  dense content vector (CONTENT_DIM)
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

IMPRESSION = "impression"

#: Explicit actions a ranker predicts, in head order.  "Positive" actions feed the
#: pretraining next-token objective; "hide" is an explicit negative.
LABEL_ACTIONS: tuple[str, ...] = ("click", "save", "hide")
POSITIVE_ACTIONS: tuple[str, ...] = ("click", "save", "share", "download", "rate_high", "tag")
ACTIONS: tuple[str, ...] = (
    IMPRESSION,
    "click",
    "save",
    "hide",
    "share",
    "download",
    "rate_low",
    "rate_mid",
    "rate_high",
    "tag",
)
EXPLICIT_ACTIONS: tuple[str, ...] = tuple(a for a in ACTIONS if a != IMPRESSION)
SURFACES: tuple[str, ...] = ("home", "search", "related", "import")

#: Ids for embedding tables: index 0 is padding, so vocab ids start at 1.
ACTION_IDS: dict[str, int] = {a: i + 1 for i, a in enumerate(ACTIONS)}
SURFACE_IDS: dict[str, int] = {s: i + 1 for i, s in enumerate(SURFACES)}

CONTENT_DIM = 16

#: The id domain of user and item ids: positive signed 64-bit integers. Item id 0 is the
#: models' padding id (sequence tensors are padded with 0), so no real item may have it,
#: and a negative id has no meaning in any source we import; user ids share the domain so
#: that one rule covers every id column. The gate quarantines rows outside it, the service
#: refuses such candidates, and the importers map a source's ids into it.
PADDING_ID = 0
MIN_ID = 1
MAX_ID = 2**63 - 1
ID_COLUMNS: tuple[str, ...] = ("user_id", "item_id")


def id_in_domain(value: object) -> bool:
    """Whether ``value`` is an int (not a bool) inside ``[MIN_ID, MAX_ID]``."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_ID <= value <= MAX_ID


def id_domain_reason(column: str) -> str:
    """The reason code a row gets when ``column`` (``user_id`` / ``item_id``) is outside the id domain."""
    return f"{column}_out_of_domain"


EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "action",
    "surface",
    "ts",
    "request_id",
    "dwell_ms",
)
REQUIRED_EVENT_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "item_id", "action", "surface", "ts")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("request_id", pa.string(), nullable=True),
        pa.field("dwell_ms", pa.int64(), nullable=True),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("content", pa.list_(pa.float32()), nullable=True),
    ]
)

#: Spark SQL type names of the event columns (what ``df.dtypes`` reports).
EVENT_SPARK_TYPES: dict[str, str] = {
    "event_id": "string",
    "user_id": "bigint",
    "item_id": "bigint",
    "action": "string",
    "surface": "string",
    "ts": "timestamp",
    "request_id": "string",
    "dwell_ms": "bigint",
}


class ContractError(ValueError):
    """Raised when data does not follow the event contract; the message names the problem."""


@dataclass(frozen=True)
class SchemaDiff:
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    wrong_type: tuple[tuple[str, str, str], ...]  # (column, expected, actual)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_type)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing columns {list(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected columns {list(self.unexpected)}")
        for col, want, got in self.wrong_type:
            parts.append(f"column {col!r} has type {got}, expected {want}")
        return "; ".join(parts) or "schema matches the event contract"


def diff_spark_schema(dtypes: list[tuple[str, str]]) -> SchemaDiff:
    """Compare a Spark ``df.dtypes`` list with the event contract."""
    got = dict(dtypes)
    missing = tuple(c for c in EVENT_COLUMNS if c not in got)
    unexpected = tuple(c for c in got if c not in EVENT_SPARK_TYPES and c != "ds")
    wrong = tuple(
        (c, EVENT_SPARK_TYPES[c], got[c])
        for c in EVENT_COLUMNS
        if c in got and got[c] != EVENT_SPARK_TYPES[c] and not (c == "ts" and got[c] == "timestamp_ntz")
    )
    return SchemaDiff(missing, unexpected, wrong)


def check_event_schema(dtypes: list[tuple[str, str]], where: str) -> None:
    """Raise ContractError naming every schema difference of a raw partition."""
    diff = diff_spark_schema(dtypes)
    if not diff.ok:
        raise ContractError(f"{where}: schema does not match the event contract: {diff.describe()}")


def validate_event_record(record: dict) -> list[str]:
    """Reasons one event record (a dict) breaks the contract; empty when valid.

    The row-level twin of the Spark gate, used by importers and the service.
    """
    reasons = []
    for col in REQUIRED_EVENT_COLUMNS:
        if record.get(col) is None:
            reasons.append(f"null_{col}")
    for col in ID_COLUMNS:
        if record.get(col) is not None and not id_in_domain(record[col]):
            reasons.append(id_domain_reason(col))
    if record.get("action") is not None and record["action"] not in ACTIONS:
        reasons.append("unknown_action")
    if record.get("surface") is not None and record["surface"] not in SURFACES:
        reasons.append("unknown_surface")
    return reasons
