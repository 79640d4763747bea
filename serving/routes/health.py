"""``/health``, the KServe (Open Inference Protocol v2) probes and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.schemas import (
    HealthResponse,
    LiveResponse,
    ReadyResponse,
)
from serving.state import ServiceMetrics, ServiceState


def health_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
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
