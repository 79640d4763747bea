"""The scoring service: ``POST /v1/rank`` over the CURRENT ranker and the Feast online store.

Routes::

    GET  /health          200 {status: ok|degraded, model_version, feature_store, ...}
                          | 503 {status: no model|warming up, ...}
    POST /v1/rank         {user_id, candidates[1..2000], surface} → items sorted by click probability
    GET  /metrics         Prometheus text: request counts, latency histogram, embedding sources
    POST /admin/reload    reload CURRENT (after `afm model promote/rollback`); Bearer $AFM_ADMIN_TOKEN
    GET  /v2/health/live, /v2/health/ready   KServe (Open Inference Protocol v2) probes

A ranking request reads the user's ``user_embedding`` and ``user_sequence`` rows and the
candidates' ``item_features`` from the online store. The stored embedding is used only
when its ``model_version`` is the loaded model's version (serving never mixes versions);
otherwise the embedding is computed from the stored sequence (an unknown user has an
empty sequence, reported as ``"user_known": false``). The stored sequence carries each
event's time (``user_sequence:event_ts_s``, unix seconds) as ``"ts"``, so a ranker trained
with time gaps gets them at serving time too; rows without times are scored without gaps.

Ids (``user_id`` and every candidate) must lie in the contract's id domain
``[MIN_ID, MAX_ID]`` (``features.contract``); item id 0 is the models' padding id. A request
body over ``max_body_bytes`` (default ``MAX_BODY_BYTES``) is refused with 413 before it is
read. Error bodies are ``{"error": str, ...}`` and echo a client's value only as a short preview.

Readiness: at start a warm-up (in a background thread by default) opens the feature store
and runs one scoring pass through the model; ``/v2/health/ready`` and ``/health`` answer 503
until it finished. ``/health`` says ``"degraded"`` (HTTP 200: the service still serves) while
the last ``/admin/reload`` failed (``reload_error``; the previous model is still served) or
the warm-up failed (``warm_up_error``); a successful reload clears ``reload_error``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import reprlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prom_values
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from features.config import Layout
from features.contract import MAX_ID, MIN_ID, PADDING_ID, SURFACES, id_in_domain

log = logging.getLogger(__name__)

MAX_CANDIDATES = 2000
PRIMARY_ACTION = "click"
ADMIN_TOKEN_ENV = "AFM_ADMIN_TOKEN"

#: Largest request body (bytes) the service reads: MAX_CANDIDATES ids as long as MAX_ID, each with
#: up to 8 bytes of separator and pretty-printing whitespace, plus 4 KiB for user_id, surface and
#: the keys. A larger body is refused with 413 before it is read; ``create_app(max_body_bytes=)``
#: and ``afm serve --max-body-bytes`` change it.
MAX_BODY_BYTES = MAX_CANDIDATES * (len(str(MAX_ID)) + 8) + 4096
#: Characters of a client's value an error message shows; the rest is only counted.
PREVIEW_CHARS = 64
#: Problems a 422 body lists; the rest are counted in one last entry.
MAX_PROBLEMS = 10

EVENT_TS = "event_ts_s"  # user_sequence's per-event unix seconds (features/feature_repo/definitions.py)
EVENT_TS_FEATURE = f"user_sequence:{EVENT_TS}"
USER_FEATURES = [
    "user_sequence:item_ids",
    "user_sequence:actions",
    "user_sequence:surfaces",
    EVENT_TS_FEATURE,
    "user_embedding:embedding",
    "user_embedding:model_version",
]
ITEM_FEATURES = ["item_features:content"]


def _bound_text(n: int) -> str:
    """``n`` as ``2^k-1`` when it is one less than a power of two (how MAX_ID reads best), else in digits."""
    k = (n + 1).bit_length() - 1
    return f"2^{k}-1" if n > 1 and n + 1 == 1 << k else str(n)


#: The id domain as error messages write it, e.g. ``1..2^63-1``.
ID_DOMAIN_TEXT = f"{MIN_ID}..{_bound_text(MAX_ID)}"

_REPR = reprlib.Repr()  # bounded repr of containers (Python 3.11's Repr takes no arguments)
_REPR.maxstring = _REPR.maxother = PREVIEW_CHARS
_REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 6, 4, 2


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with how many it had when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def _preview(value: object) -> str:
    """A short rendering of a client's value for an error message: never the whole of a large input.

    Strings are quoted and cut to PREVIEW_CHARS (``'xxxx…'…(N chars)``), an integer too long to
    print briefly is described by its size (``str`` of a 5,000-digit int is refused by Python),
    containers are abbreviated (``reprlib``).
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 4 * PREVIEW_CHARS:
            return f"<an integer of {value.bit_length()} bits>"
        return _clip(str(value))
    if isinstance(value, str):
        return repr(value) if len(value) <= PREVIEW_CHARS else f"{value[:PREVIEW_CHARS]!r}…({len(value)} chars)"
    return _clip(_REPR.repr(value))


def _outside_domain(kind: str, value: int) -> str:
    """Why ``value`` (a ``kind`` id: "user" or "item") is refused, for a 422."""
    reason = f"{kind} id {_preview(value)} is outside the id domain {ID_DOMAIN_TEXT}"
    if kind == "item" and value == PADDING_ID:
        reason += f" ({PADDING_ID} is the padding id)"
    return reason


def _in_domain(kind: str) -> Callable[[int], int]:
    """A pydantic after-validator refusing ``kind`` ids ("user" or "item") outside the id domain."""

    def check(value: int) -> int:
        if not id_in_domain(value):
            raise ValueError(_outside_domain(kind, value))
        return value

    return check


#: JSON schema of an id: what ``id_in_domain`` accepts (MIN_ID..MAX_ID fits a signed 64-bit integer).
_ID_SCHEMA = {"format": "int64", "minimum": MIN_ID, "maximum": MAX_ID}
UserId = Annotated[StrictInt, AfterValidator(_in_domain("user")), Field(json_schema_extra=_ID_SCHEMA)]
ItemId = Annotated[StrictInt, AfterValidator(_in_domain("item")), Field(json_schema_extra=_ID_SCHEMA)]


class RankingModel(Protocol):
    """What the service needs from a ranker (``serving.model.ServingModel`` implements it)."""

    version: str
    actions: tuple[str, ...]
    embedding_dim: int

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray: ...  # (U, D); sequences as UserRow.sequence

    def score(
        self,
        user_embedding: np.ndarray,
        candidates: list[int],
        surface: str,
        content: dict[int, list[float]] | None = None,
        sequence: dict | None = None,
    ) -> np.ndarray: ...  # (C, A)


@dataclass
class UserRow:
    """The online features of one user; ``None`` fields were not found."""

    sequence: dict | None = None  # {"item_ids", "actions", "surfaces"[, "ts"]}; ts: unix seconds per event
    embedding: list[float] | None = None
    model_version: str | None = None


class OnlineFeatures(Protocol):
    """Where the service reads features from (Feast by default).

    An implementation may also have ``warm_up() -> None``: called once at start, before the
    service reports ready, to open connections (raise when the store cannot be opened).
    Implementations without it are served as they are.
    """

    def status(self) -> str: ...

    def user(self, user_id: int) -> UserRow: ...

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]: ...


class FeastOnlineFeatures:
    """Reads the ranking features from the Feast online store under ``layout.feast``."""

    def __init__(self, layout: Layout) -> None:
        """Args:
        layout: The data root whose Feast registry and online store to read.
        """
        self.layout = layout
        self._store: Any = None
        self._lock = threading.Lock()
        self._has_event_ts = False  # once the registry has user_sequence's event times, it keeps them
        self._warned_no_event_ts = False

    def _fs(self) -> Any:
        from features.store import FeatureStoreError, feature_store, is_registered, registry_location

        if self._store is None:
            with self._lock:
                if self._store is None:
                    if not is_registered(self.layout):
                        raise FeatureStoreError(
                            f"no Feast registry at {registry_location(self.layout)}; run `afm features register`"
                        )
                    self._store = feature_store(self.layout)
        return self._store

    @property
    def is_open(self) -> bool:
        """Whether the Feast store was opened (by ``warm_up`` or a first read)."""
        return self._store is not None

    def warm_up(self) -> None:
        """Open the store and read one user's and one item's rows, so the first request pays neither.

        Raises:
            FeatureStoreError: when there is no Feast registry under ``layout.feast``.
        """
        started = time.perf_counter()
        self._fs()
        self.user(MIN_ID)  # an unknown id reads as absent: what matters is the connection and the registry
        self.item_content([MIN_ID])
        log.info("feature store open and read in %.2f s", time.perf_counter() - started)

    def status(self) -> str:
        """``"ok"`` when the registry exists, else a short reason."""
        from features.store import FeatureStoreError, is_registered

        try:
            return "ok" if is_registered(self.layout) else "not registered (run `afm features register`)"
        except FeatureStoreError as exc:  # a SQL registry that cannot be reached
            return str(exc)

    def _user_features(self, fs: Any) -> list[str]:
        """USER_FEATURES, less the event times while the registry predates them (scored without gaps)."""
        if self._has_event_ts:
            return USER_FEATURES
        if EVENT_TS in {f.name for f in fs.get_feature_view("user_sequence").features}:
            self._has_event_ts = True
            return USER_FEATURES
        if not self._warned_no_event_ts:
            self._warned_no_event_ts = True
            log.warning(
                "the Feast registry's user_sequence view has no %s field: sequences are scored without time "
                "gaps; run `afm features register`, then re-export and materialize the sequences",
                EVENT_TS,
            )
        return [f for f in USER_FEATURES if f != EVENT_TS_FEATURE]

    def user(self, user_id: int) -> UserRow:
        """The user's sequence (with per-event times when stored) and stored embedding (``None`` where absent)."""
        fs = self._fs()
        got = fs.get_online_features(features=self._user_features(fs), entity_rows=[{"user_id": user_id}]).to_dict()
        row = UserRow()
        if got["item_ids"][0] is not None:
            row.sequence = {
                "item_ids": list(got["item_ids"][0]),
                "actions": list(got["actions"][0] or []),
                "surfaces": list(got["surfaces"][0] or []),
            }
            ts = (got.get(EVENT_TS) or [None])[0]
            if ts is not None and len(ts) == len(row.sequence["item_ids"]):
                row.sequence["ts"] = [int(t) for t in ts]  # unix seconds, aligned with item_ids
            elif ts is not None:
                log.warning(
                    "user %d: %d event times for %d events in the online store; scoring without time gaps",
                    user_id,
                    len(ts),
                    len(row.sequence["item_ids"]),
                )
        if got["embedding"][0] is not None:
            row.embedding = list(got["embedding"][0])
            row.model_version = got["model_version"][0]
        return row

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        """Content vectors of the items that have one in the online store."""
        got = (
            self._fs()
            .get_online_features(features=ITEM_FEATURES, entity_rows=[{"item_id": int(i)} for i in item_ids])
            .to_dict()
        )
        return {int(i): list(c) for i, c in zip(got["item_id"], got["content"], strict=True) if c is not None}


# ----------------------------------------------------------------------- schemas
class RankRequest(BaseModel):
    """Body of ``POST /v1/rank``."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId = Field(description="The user to rank for; an id of the contract's id domain.")
    candidates: list[ItemId] = Field(
        description=f"Item ids to rank: 1 to {MAX_CANDIDATES}, no duplicates, each in the id domain.",
        json_schema_extra={"minItems": 1, "maxItems": MAX_CANDIDATES, "uniqueItems": True},
    )
    surface: str = Field(description="Where the items will be shown.", json_schema_extra={"enum": list(SURFACES)})

    @field_validator("candidates")
    @classmethod
    def _candidates_ok(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= MAX_CANDIDATES:
            raise ValueError(f"candidates must hold 1 to {MAX_CANDIDATES} item ids, got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError("candidates must not contain duplicate item ids")
        return v

    @field_validator("surface")
    @classmethod
    def _surface_known(cls, v: str) -> str:
        if v not in SURFACES:
            raise ValueError(f"surface must be one of {list(SURFACES)}, got {_preview(v)}")
        return v


class RankedItem(BaseModel):
    """One candidate with its probabilities."""

    item_id: ItemId
    score: float = Field(description="Probability of the primary action.")
    scores: dict[str, float] = Field(description="Probability of each action the model predicts.")


class RankResponse(BaseModel):
    """Answer of ``POST /v1/rank``: the candidates, most probable primary action first."""

    model_version: str
    user_id: UserId
    surface: str = Field(json_schema_extra={"enum": list(SURFACES)})
    user_known: bool = Field(description="Whether the online store has the user's sequence.")
    embedding_source: Literal["precomputed", "computed"]
    primary_action: str
    items: list[RankedItem]


class ErrorBody(BaseModel):
    """Every error answer: ``error`` says what went wrong; some errors add fields."""

    model_config = ConfigDict(extra="allow")

    error: str
    problems: list[str] | None = Field(default=None, description="422: each problem of the request.")
    model_version: str | None = Field(default=None, description="Failed reload: the model still served.")


class HealthResponse(BaseModel):
    """``GET /health``: 200 ``ok``/``degraded`` while serving, 503 ``no model``/``warming up``."""

    status: Literal["ok", "degraded", "warming up", "no model"]
    model_version: str | None
    feature_store: str
    actions: list[str] | None = None
    error: str | None = Field(default=None, description="no model: why loading failed.")
    reload_error: str | None = Field(default=None, description="degraded: why the last reload failed.")
    warm_up_error: str | None = Field(default=None, description="degraded: why the start-up warm-up failed.")


class ReadyResponse(BaseModel):
    ready: bool


class LiveResponse(BaseModel):
    live: bool


class ReloadResponse(BaseModel):
    reloaded: bool
    model_version: str
    previous: str | None


_ERROR_DESCRIPTIONS = {
    401: "No valid 'Authorization: Bearer <token>' header (WWW-Authenticate: Bearer).",
    403: "The admin token is not valid.",
    413: "The request body is over the size limit (refused before it is read).",
    422: "The request is not valid; `problems` lists why.",
    500: "The reload failed; the previous model is still served.",
    503: "Not available: no model loaded, the feature store is down, or admin routes are disabled.",
}


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the error statuses ``codes``, all with the ErrorBody schema."""
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


# ------------------------------------------------------------------------- state
_EMPTY_SEQUENCE: dict[str, list] = {"item_ids": [], "actions": [], "surfaces": []}


def _score_once(model: RankingModel) -> None:
    """One scoring pass (an unknown user, one candidate), so that lazy set-up happens before traffic."""
    embedding = model.user_embeddings([dict(_EMPTY_SEQUENCE)])[0]  # (U=1, D) → (D,)
    probs = np.asarray(model.score(embedding, [MIN_ID], SURFACES[0], None, sequence=dict(_EMPTY_SEQUENCE)))
    if probs.shape != (1, len(model.actions)):
        raise ValueError(
            f"warm-up: the model returned scores of shape {probs.shape}, expected (1, {len(model.actions)})"
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _State:
    layout: Layout
    loader: Callable[[], RankingModel]
    features: OnlineFeatures
    model: RankingModel | None = None
    load_error: str | None = None  # the last load's failure: at start (no model) or a reload (old model kept)
    warm_up_error: str | None = None
    warmed: threading.Event = field(default_factory=threading.Event)
    reload_lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, *, score_once: bool) -> None:
        """Load the ranker (and with ``score_once`` run one scoring pass); the served model changes only on success."""
        try:
            model = self.loader()
            if score_once:
                _score_once(model)
        except Exception as exc:  # any failure: keep serving the old model, report why
            self.load_error = _describe(exc)
            log.warning("could not load the ranker: %s", self.load_error)
            raise
        self.model, self.load_error = model, None
        log.info("serving ranker %s", model.version)

    def warm_up(self) -> None:
        """Open the feature store and run one scoring pass; then ready. A failure is logged and reported."""
        started = time.perf_counter()
        try:
            warm_features = getattr(self.features, "warm_up", None)  # optional in OnlineFeatures
            if warm_features is not None:
                warm_features()
            model = self.model
            if model is not None:
                _score_once(model)
        except Exception as exc:  # noqa: BLE001 - requests open the store again; /health reports it
            self.warm_up_error = _describe(exc)
            log.warning("warm-up failed (serving anyway): %s", self.warm_up_error)
        finally:
            self.warmed.set()
        log.info("warm-up finished in %.2f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.warmed.is_set()


class _Metrics:
    """The app's own Prometheus metrics, in memory.

    Importing ``feast`` sets ``PROMETHEUS_MULTIPROC_DIR`` (for its own feature server); when
    that happens before ``prometheus_client`` is first imported, every metric value becomes
    file-backed and shared by all the metrics of that name in the process, so two apps (or
    a reload in tests) would add up each other's counts. The service runs one process per
    app and never aggregates across processes: its values stay in memory.
    """

    def __init__(self) -> None:
        prom_values.ValueClass = prom_values.MutexValue  # read when each (labelled) value is created
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "afm_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "afm_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.embedding_source = Counter(
            "afm_rank_embedding_source", "Ranking requests by user-embedding source", ["source"], registry=self.registry
        )
        self.candidates = Histogram(
            "afm_rank_candidates",
            "Candidates per ranking request",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
            registry=self.registry,
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)


def _problems_response(problems: list[str]) -> JSONResponse:
    """The 422 of an invalid request: at most MAX_PROBLEMS problems, the rest counted."""
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"… and {len(problems) - MAX_PROBLEMS} more problems"]
    return _error(422, "invalid request: " + "; ".join(problems), problems=problems)


def _where(loc: Sequence[Any]) -> str:
    """A pydantic error location as the request writes it: ``candidates[3]``, ``user_id``; ``body`` for the whole."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _clip(str(part))
    return out or "body"


def _problem(err: dict[str, Any]) -> str:
    """One validation error as ``where: why``, without the raw input."""
    if err.get("type") == "json_invalid":  # FastAPI: loc = ("body", byte position)
        position = next((p for p in err.get("loc", ())[1:] if isinstance(p, int)), None)
        reason = str((err.get("ctx") or {}).get("error", "malformed"))
        return f"body: not valid JSON ({_clip(reason)}{'' if position is None else f' at byte {position}'})"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{_where(err.get('loc', ()))}: {_clip(msg, 4 * PREVIEW_CHARS)}"


def _default_loader(layout: Layout) -> Callable[[], RankingModel]:
    def load() -> RankingModel:
        from serving.model import load_ranker

        return load_ranker(layout)

    return load


def _exact_id_bounds(node: Any) -> None:
    """Put the exact MIN_ID/MAX_ID back into every int64 schema of an OpenAPI document, in place.

    FastAPI's OpenAPI model stores ``minimum``/``maximum`` as floats, and ``float(2**63 - 1)``
    is 2^63: the spec would admit an id the service refuses.
    """
    if isinstance(node, dict):
        if node.get("format") == "int64":
            for key, exact in (("minimum", MIN_ID), ("maximum", MAX_ID)):
                if isinstance(node.get(key), float) and node[key] == float(exact):
                    node[key] = exact
        for value in node.values():
            _exact_id_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_id_bounds(value)


# -------------------------------------------------------------------- body limit
class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, before the app reads or parses it.

    A declared ``Content-Length`` over the limit is refused at once, without reading the body.
    Otherwise the body is read while counting its bytes (chunked requests have no
    ``Content-Length``) and refused as soon as the count passes the limit; a body within the
    limit is handed to the app whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes")
            return

        chunks: list[bytes] = []
        size = 0
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees that
                pending.append(message)
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"request body is over the limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, message: str) -> None:
        body = json.dumps({"error": f"{message}; send at most {MAX_CANDIDATES} candidates per request"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The request's declared ``Content-Length``; ``None`` when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------- app
def create_app(
    layout: Layout,
    model_loader: Callable[[], RankingModel] | None = None,
    online_features: OnlineFeatures | None = None,
    *,
    warm_up_in_background: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """Build the scoring service.

    Args:
        layout: The data root (models under ``layout.models``, Feast under ``layout.feast``).
        model_loader: Returns the model to serve; default loads CURRENT with
            ``serving.model.load_ranker(layout)``. Called at start and on ``/admin/reload``.
        online_features: Feature reader; default reads the Feast online store of ``layout``.
        warm_up_in_background: Warm up (open the feature store, one scoring pass) in a thread,
            ready when it finished (default); ``False`` warms up before returning.
        max_body_bytes: Largest request body read; larger ones get 413 before they are read.

    Returns:
        The FastAPI application. It starts without a model when loading fails (``/health`` → 503).

    Raises:
        ValueError: when ``max_body_bytes`` is not positive.

    Example::

        app = create_app(Layout.default(), warm_up_in_background=False)
        uvicorn.run(app, port=8080)
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive number of bytes, got {max_body_bytes}")
    state = _State(
        layout=layout,
        loader=model_loader or _default_loader(layout),
        features=online_features or FeastOnlineFeatures(layout),
    )
    try:
        state.load(score_once=False)  # the warm-up runs the first scoring pass
    except Exception:  # noqa: BLE001 - reported by /health
        pass
    if warm_up_in_background:
        threading.Thread(target=state.warm_up, name="afm-warm-up", daemon=True).start()
    else:
        state.warm_up()
    metrics = _Metrics()

    app = FastAPI(title="ActivityFM scoring service", version="1")
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's spec with the exact id bounds (its OpenAPI model keeps minimum/maximum as floats)."""
        if app.openapi_schema is None:
            _exact_id_bounds(fastapi_openapi())  # fills app.openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.afm = state
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)  # inside the metrics middleware: 413s count too
    _add_request_metrics(app, metrics)
    _add_error_handlers(app)
    app.include_router(_health_router(state, metrics))
    app.include_router(_ranking_router(state, metrics))
    app.include_router(_admin_router(state))
    return app


def _add_request_metrics(app: FastAPI, metrics: _Metrics) -> None:
    """Count every request by route, method and status, and time it."""

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            metrics.requests.labels(name, request.method, str(status)).inc()
            metrics.latency.labels(name).observe(time.perf_counter() - start)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"error": str, ...}`` and echoes a client's value only as a short preview."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _problems_response([_problem(err) for err in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ValueError):
            # FastAPI could not decode the body (not UTF-8, an integer too long to convert): as malformed JSON
            return _problems_response([f"body: not valid JSON ({_clip(_describe(cause), 4 * PREVIEW_CHARS)})"])
        return _error(exc.status_code, _clip(str(exc.detail), 4 * PREVIEW_CHARS), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {_clip(_describe(exc), 4 * PREVIEW_CHARS)}")


def _health_router(state: _State, metrics: _Metrics) -> APIRouter:
    """``/health``, the KServe probes and ``/metrics``."""
    router = APIRouter()

    @router.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "No model loaded, or still warming up."}},
    )
    def health() -> JSONResponse:
        """Serving state: 200 ``ok`` or ``degraded`` (serving, but a reload or the warm-up failed), else 503."""
        model = state.model
        body: dict[str, Any] = {"feature_store": state.features.status()}
        if model is None:
            body.update(status="no model", model_version=None, error=state.load_error)
            return JSONResponse(status_code=503, content=body)
        body.update(model_version=model.version, actions=list(model.actions))
        if not state.warmed.is_set():
            return JSONResponse(status_code=503, content={"status": "warming up", **body})
        problems = {"reload_error": state.load_error, "warm_up_error": state.warm_up_error}
        problems = {k: v for k, v in problems.items() if v is not None}
        return JSONResponse(content={"status": "degraded" if problems else "ok", **body, **problems})

    @router.get("/v2/health/live", response_model=LiveResponse)
    def live() -> dict:
        return {"live": True}

    @router.get(
        "/v2/health/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "No model loaded, or still warming up."}},
    )
    def ready() -> JSONResponse:
        ok = state.ready
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok})

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _ranking_router(state: _State, metrics: _Metrics) -> APIRouter:
    """``POST /v1/rank``."""
    router = APIRouter()

    @router.post("/v1/rank", response_model=RankResponse, responses=_error_responses(413, 422, 503))
    def rank(req: RankRequest) -> JSONResponse:
        """Rank the candidates for the user by the probability of the primary action (click)."""
        return _rank(state, metrics, req)

    return router


def _rank(state: _State, metrics: _Metrics, req: RankRequest) -> JSONResponse:
    """Score one validated request with the model loaded now (a reload during the request cannot mix versions)."""
    model = state.model
    if model is None:
        return _error(503, f"no model loaded: {state.load_error}")
    try:
        user = state.features.user(req.user_id)
        content = state.features.item_content(req.candidates)
    except Exception as exc:  # noqa: BLE001 - the store is down or not set up
        log.warning("feature store read failed: %s", exc)
        return _error(503, f"feature store unavailable: {_clip(_describe(exc), 4 * PREVIEW_CHARS)}")

    sequence = user.sequence or dict(_EMPTY_SEQUENCE)
    if (
        user.embedding is not None
        and user.model_version == model.version
        and len(user.embedding) == model.embedding_dim
    ):
        embedding = np.asarray(user.embedding, dtype=np.float32)  # (D,)
        source = "precomputed"
    else:
        embedding = model.user_embeddings([sequence])[0]  # (U=1, D) → (D,)
        source = "computed"
    metrics.embedding_source.labels(source).inc()
    metrics.candidates.observe(len(req.candidates))

    # early-fusion rankers (DCAT) also read the sequence: one context pass, candidates cross-attend
    probs = np.asarray(
        model.score(embedding, list(req.candidates), req.surface, content or None, sequence=sequence)
    )  # (C, A)
    if probs.shape != (len(req.candidates), len(model.actions)):
        return _error(500, f"model returned scores of shape {probs.shape}, expected ({len(req.candidates)}, A)")
    primary = model.actions.index(PRIMARY_ACTION) if PRIMARY_ACTION in model.actions else 0
    order = np.argsort(-probs[:, primary], kind="stable")  # (C,)
    items = [
        {
            "item_id": int(req.candidates[j]),
            "score": float(probs[j, primary]),
            "scores": {a: float(probs[j, k]) for k, a in enumerate(model.actions)},
        }
        for j in order.tolist()
    ]
    return JSONResponse(
        content={
            "model_version": model.version,
            "user_id": req.user_id,
            "surface": req.surface,
            "user_known": user.sequence is not None,
            "embedding_source": source,
            "primary_action": model.actions[primary],
            "items": items,
        }
    )


def _admin_router(state: _State) -> APIRouter:
    """``POST /admin/reload``, behind the ``$AFM_ADMIN_TOKEN`` bearer token."""
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description=f"The admin token (${ADMIN_TOKEN_ENV}).")

    @router.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=_error_responses(401, 403, 413, 500, 503),
    )
    def reload(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> JSONResponse:
        """Load CURRENT again (after ``afm model promote/rollback``) and serve it once it scored one request."""
        expected = os.environ.get(ADMIN_TOKEN_ENV)
        if not expected:
            return _error(503, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
        if credentials is None:  # no header, another scheme, or no token
            return _error(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.strip().encode(), expected.encode()):
            return _error(403, "the admin token is not valid")
        previous = state.model.version if state.model is not None else None
        with state.reload_lock:
            try:
                state.load(score_once=True)
            except Exception as exc:  # noqa: BLE001 - keep serving the old model
                return _error(
                    500,
                    f"reload failed, still serving {previous}: {_clip(_describe(exc), 4 * PREVIEW_CHARS)}",
                    model_version=previous,
                )
        assert state.model is not None
        return JSONResponse(content={"reloaded": True, "model_version": state.model.version, "previous": previous})

    return router
