"""The scoring service: ``POST /v1/rank`` over the CURRENT ranker and the Feast online store.

Routes::

    GET  /health          200 {status, model_version, feature_store} | 503 when no model is loaded
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
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prom_values
from pydantic import BaseModel, ConfigDict, StrictInt, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.config import Layout
from features.contract import SURFACES

log = logging.getLogger(__name__)

MAX_CANDIDATES = 2000
PRIMARY_ACTION = "click"
ADMIN_TOKEN_ENV = "AFM_ADMIN_TOKEN"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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


class RankingModel(Protocol):
    """What the service needs from a ranker (``training.serving_model.ServingModel`` implements it)."""

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
    """Where the service reads features from (Feast by default)."""

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
        from features.store import FeatureStoreError, feature_store, is_registered

        if self._store is None:
            with self._lock:
                if self._store is None:
                    if not is_registered(self.layout):
                        raise FeatureStoreError(
                            f"no Feast registry under {self.layout.feast}; run `afm features register`"
                        )
                    self._store = feature_store(self.layout)
        return self._store

    def status(self) -> str:
        """``"ok"`` when the registry exists, else a short reason."""
        from features.store import is_registered

        return "ok" if is_registered(self.layout) else "not registered (run `afm features register`)"

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

    user_id: StrictInt
    candidates: list[StrictInt]
    surface: str

    @field_validator("user_id")
    @classmethod
    def _user_in_range(cls, v: int) -> int:
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError("user_id must fit in a signed 64-bit integer")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates_ok(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= MAX_CANDIDATES:
            raise ValueError(f"candidates must hold 1 to {MAX_CANDIDATES} item ids, got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError("candidates must not contain duplicate item ids")
        if any(not INT64_MIN <= c <= INT64_MAX for c in v):
            raise ValueError("candidate item ids must fit in a signed 64-bit integer")
        return v

    @field_validator("surface")
    @classmethod
    def _surface_known(cls, v: str) -> str:
        if v not in SURFACES:
            raise ValueError(f"surface must be one of {list(SURFACES)}, got {v!r}")
        return v


# ------------------------------------------------------------------------- state
@dataclass
class _State:
    layout: Layout
    loader: Callable[[], RankingModel]
    features: OnlineFeatures
    model: RankingModel | None = None
    load_error: str | None = None
    reload_lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        try:
            model = self.loader()
        except Exception as exc:  # any failure: keep serving the old model, report why
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.warning("could not load the ranker: %s", self.load_error)
            raise
        self.model, self.load_error = model, None
        log.info("serving ranker %s", model.version)


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


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


def _default_loader(layout: Layout) -> Callable[[], RankingModel]:
    def load() -> RankingModel:
        from training.artifacts import load_ranker

        return load_ranker(layout)

    return load


# --------------------------------------------------------------------------- app
def create_app(
    layout: Layout,
    model_loader: Callable[[], RankingModel] | None = None,
    online_features: OnlineFeatures | None = None,
) -> FastAPI:
    """Build the scoring service.

    Args:
        layout: The data root (models under ``layout.models``, Feast under ``layout.feast``).
        model_loader: Returns the model to serve; default loads CURRENT with
            ``training.artifacts.load_ranker(layout)``. Called at start and on ``/admin/reload``.
        online_features: Feature reader; default reads the Feast online store of ``layout``.

    Returns:
        The FastAPI application. It starts without a model when loading fails (``/health`` → 503).
    """
    state = _State(
        layout=layout,
        loader=model_loader or _default_loader(layout),
        features=online_features or FeastOnlineFeatures(layout),
    )
    try:
        state.load()
    except Exception:  # noqa: BLE001 - reported by /health
        pass
    metrics = _Metrics()

    app = FastAPI(title="ActivityFM scoring service", version="1")
    app.state.afm = state
    app.state.metrics = metrics

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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{where}: {msg}")
        return _error(422, "invalid request: " + "; ".join(problems), problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    def health() -> JSONResponse:
        model = state.model
        body = {"feature_store": state.features.status()}
        if model is None:
            return JSONResponse(
                status_code=503,
                content={"status": "no model", "model_version": None, "error": state.load_error, **body},
            )
        return JSONResponse(
            content={"status": "ok", "model_version": model.version, "actions": list(model.actions), **body}
        )

    @app.get("/v2/health/live")
    def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> JSONResponse:
        ok = state.model is not None
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/rank")
    def rank(req: RankRequest) -> JSONResponse:
        model = state.model  # one reference for the whole request: a reload cannot mix versions
        if model is None:
            return _error(503, f"no model loaded: {state.load_error}")
        try:
            user = state.features.user(req.user_id)
            content = state.features.item_content(req.candidates)
        except Exception as exc:  # noqa: BLE001 - the store is down or not set up
            log.warning("feature store read failed: %s", exc)
            return _error(503, f"feature store unavailable: {type(exc).__name__}: {exc}")

        sequence = user.sequence or {"item_ids": [], "actions": [], "surfaces": []}
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

    @app.post("/admin/reload")
    def reload(request: Request) -> JSONResponse:
        expected = os.environ.get(ADMIN_TOKEN_ENV)
        if not expected:
            return _error(503, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            return _error(403, "a valid 'Authorization: Bearer <token>' header is required")
        previous = state.model.version if state.model is not None else None
        with state.reload_lock:
            try:
                state.load()
            except Exception as exc:  # noqa: BLE001 - keep serving the old model
                return _error(
                    500,
                    f"reload failed, still serving {previous}: {type(exc).__name__}: {exc}",
                    model_version=previous,
                )
        assert state.model is not None
        return JSONResponse(content={"reloaded": True, "model_version": state.model.version, "previous": previous})

    return app
