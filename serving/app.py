"""The scoring service: ``POST /v1/rank`` over the CURRENT ranker and the Feast online store.

Routes::

    GET  /health          200 {status: ok|degraded, model_version, feature_store, ...}
                          | 503 {status: no model|warming up, ...}
    POST /v1/rank         {user_id, candidates[1..2000], surface[, request_time]} → items sorted by click probability
    POST /v1/events       {events[1..1000]} today's events → realtime sequences; invalid ones rejected with reasons
    GET  /metrics         Prometheus text: request counts, latency histogram, embedding sources
    POST /admin/reload    reload CURRENT (after `afm model promote/rollback`); Bearer $AFM_ADMIN_TOKEN
    GET  /v2/health/live, /v2/health/ready   KServe (Open Inference Protocol v2) probes
    GET  /v2/models/ranker[/versions/V]          OIP v2 model metadata (name, versions, platform, tensors)
    GET  /v2/models/ranker[/versions/V]/ready    200 {name, ready: true} | 503 {name, ready: false}
    POST /v2/models/ranker[/versions/V]/infer    OIP v2 tensors user_id, candidate_ids, surface → scores [C, A]

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

The package, one concern per module: ``app`` (this: build the app, middleware, error
handlers), ``routes/`` (one module per group of routes), ``schemas`` (request and response
models, the id domain, error bodies), ``state`` (the loaded ranker, readiness, metrics),
``online_features`` (the Feast reader), ``body_limit`` (413 before parsing), ``model``
(loading a ranker for serving).

Readiness: at start a warm-up (in a background thread by default) opens the feature store
and runs one scoring pass through the model; ``/v2/health/ready`` and ``/health`` answer 503
until it finished. ``/health`` says ``"degraded"`` (HTTP 200: the service still serves) while
the last ``/admin/reload`` failed (``reload_error``; the previous model is still served) or
the warm-up failed (``warm_up_error``); a successful reload clears ``reload_error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.config import Layout
from serving.body_limit import BodySizeLimit
from serving.online_features import FeastOnlineFeatures, OnlineFeatures
from serving.routes.admin import admin_router
from serving.routes.events import events_router
from serving.routes.health import health_router
from serving.routes.oip import include_oip_routes
from serving.routes.ranking import ranking_router
from serving.schemas import (
    MAX_BODY_BYTES,
    PREVIEW_CHARS,
    clip,
    describe,
    error_response,
    exact_id_bounds,
    problems_response,
    validation_problem,
)
from serving.state import RankingModel, ServiceMetrics, ServiceState, default_loader

log = logging.getLogger(__name__)


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
    state = ServiceState(
        layout=layout,
        loader=model_loader or default_loader(layout),
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
    metrics = ServiceMetrics()

    app = FastAPI(title="ActivityFM scoring service", version="1")
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's spec with the exact id bounds (its OpenAPI model keeps minimum/maximum as floats)."""
        if app.openapi_schema is None:
            exact_id_bounds(fastapi_openapi())  # fills app.openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.afm = state
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)  # inside the metrics middleware: 413s count too
    _add_request_metrics(app, metrics)
    _add_error_handlers(app)
    app.include_router(health_router(state, metrics))
    app.include_router(ranking_router(state, metrics))
    app.include_router(events_router(state, metrics))
    app.include_router(admin_router(state))
    include_oip_routes(app, state, metrics)
    return app


def _add_request_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
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
        return problems_response([validation_problem(err) for err in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ValueError):
            # FastAPI could not decode the body (not UTF-8, an integer too long to convert): as malformed JSON
            return problems_response([f"body: not valid JSON ({clip(describe(cause), 4 * PREVIEW_CHARS)})"])
        return error_response(exc.status_code, clip(str(exc.detail), 4 * PREVIEW_CHARS), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {clip(describe(exc), 4 * PREVIEW_CHARS)}")
