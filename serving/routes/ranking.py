"""``POST /v1/rank``: the friendly ranking route."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving.schemas import (
    PREVIEW_CHARS,
    PRIMARY_ACTION,
    RankRequest,
    RankResponse,
    clip,
    describe,
    error_response,
    error_responses,
)
from serving.state import EMPTY_SEQUENCE, ServiceMetrics, ServiceState

log = logging.getLogger(__name__)


def ranking_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
    """``POST /v1/rank``."""
    router = APIRouter()

    @router.post("/v1/rank", response_model=RankResponse, responses=error_responses(413, 422, 503))
    def rank(req: RankRequest) -> JSONResponse:
        """Rank the candidates for the user by the probability of the primary action (click)."""
        return _rank(state, metrics, req)

    return router


def _rank(state: ServiceState, metrics: ServiceMetrics, req: RankRequest) -> JSONResponse:
    """Score one validated request with the model loaded now (a reload during the request cannot mix versions)."""
    model = state.model
    if model is None:
        return error_response(503, f"no model loaded: {state.load_error}")
    try:
        user = state.features.user(req.user_id)
        content = state.features.item_content(req.candidates)
    except Exception as exc:  # noqa: BLE001 - the store is down or not set up
        log.warning("feature store read failed: %s", exc)
        return error_response(503, f"feature store unavailable: {clip(describe(exc), 4 * PREVIEW_CHARS)}")

    sequence = user.sequence or dict(EMPTY_SEQUENCE)
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
        return error_response(500, f"model returned scores of shape {probs.shape}, expected ({len(req.candidates)}, A)")
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
