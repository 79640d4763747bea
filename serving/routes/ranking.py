"""``POST /v1/rank``: the friendly ranking route.

The user's sequence is the daily snapshot merged with the realtime events pushed since
(``POST /v1/events``; :func:`serving.online_features.merge_sequences`). A request may carry
its time (``request_time``, RFC 3339): then only events strictly before it count and the
candidates' ages are taken at it, as in the training examples; without it, every stored
event counts and the time is now. A stored user embedding (published from the daily
snapshot) is used when its model version is the served one; otherwise the embedding is
computed from the sequence's events before the request's day, the history a published
embedding covers (:func:`history_before_day`), as fine-tuning computes it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import orjson
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from serving.batching import ScoreJob, takes
from serving.model import ScoreRequest, history_before_day
from serving.routes.events import parse_time_us
from serving.schemas import (
    PREVIEW_CHARS,
    PRIMARY_ACTION,
    RankRequest,
    RankResponse,
    clip,
    describe,
    error_response,
    error_responses,
    preview,
)
from serving.state import EMPTY_SEQUENCE, ServiceMetrics, ServiceState

log = logging.getLogger(__name__)

_US = 1_000_000
_DAY_S = 86_400


class RankingJSONResponse(JSONResponse):
    """``/v1/rank``'s answer, encoded with orjson: the same JSON as ``JSONResponse`` (shortest round-trip floats),
    several times faster for thousands of scores, and the encoding holds the interpreter for less time."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


class TimedRankRequest(RankRequest):
    """Body of ``POST /v1/rank``: a ranking request, optionally with its time."""

    request_time: str | None = Field(
        default=None,
        description=(
            "When the request was made: an RFC 3339 date-time with an offset (e.g. 2026-01-04T10:00:00.123456Z). "
            "Only the user's events strictly before it count, and candidate ages are taken at it. Default: now, "
            "with every stored event."
        ),
        json_schema_extra={"examples": ["2026-01-04T10:00:00Z"]},
    )

    @field_validator("request_time")
    @classmethod
    def _rfc3339(cls, v: str | None) -> str | None:
        if v is not None and parse_time_us(v) is None:
            raise ValueError(
                f"request_time must be an RFC 3339 date-time with an offset, e.g. 2026-01-04T10:00:00Z, got {preview(v)}"
            )
        return v


class TimedRankResponse(RankResponse):
    """Answer of ``POST /v1/rank``."""

    realtime_events: int = Field(
        default=0, description="How many events of the user's sequence came from today's realtime events."
    )


def ranking_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
    """``POST /v1/rank``."""
    router = APIRouter()

    @router.post("/v1/rank", response_model=TimedRankResponse, responses=error_responses(413, 422, 503))
    def rank(req: TimedRankRequest) -> JSONResponse:
        """Rank the candidates for the user by the probability of the primary action (click)."""
        return _rank(state, metrics, req)

    return router


def server_timing(**seconds: float) -> str:
    """A ``Server-Timing`` header value: ``features;dur=1.203, model;dur=8.514`` (milliseconds).

    ``features`` is the online-store read, ``queue`` the wait for a turn in the model
    (``AFM_MODEL_CONCURRENCY``), ``model`` the user embedding (when computed) and the scoring; a
    client that also times the whole request sees what lies outside them.
    """
    return ", ".join(f"{name};dur={value * 1e3:.3f}" for name, value in seconds.items())


def _rank(state: ServiceState, metrics: ServiceMetrics, req: RankRequest) -> JSONResponse:
    """Score one validated request with the model loaded now (a reload during the request cannot mix versions).

    ``req`` may be a :class:`TimedRankRequest` (with ``request_time``) or a plain ``RankRequest`` (now).
    """
    model = state.model
    if model is None:
        return error_response(503, f"no model loaded: {state.load_error}")
    request_time = getattr(req, "request_time", None)
    before_us = None if request_time is None else parse_time_us(request_time)
    started = time.perf_counter()
    try:
        if before_us is None or not takes(state.features.user, "before_us"):
            user = state.features.user(req.user_id)
        else:  # only the events strictly before the request
            user = state.features.user(req.user_id, before_us=before_us)
        content = state.features.item_content(req.candidates)
    except Exception as exc:  # noqa: BLE001 - the store is down or not set up
        log.warning("feature store read failed: %s", exc)
        return error_response(503, f"feature store unavailable: {clip(describe(exc), 4 * PREVIEW_CHARS)}")

    fetched = time.perf_counter()
    sequence = user.sequence or dict(EMPTY_SEQUENCE)
    realtime_events = int(getattr(user, "realtime_events", 0))
    request_s = int(time.time()) if before_us is None else before_us // _US
    stored = (
        user.embedding is not None
        and user.model_version == model.version
        and len(user.embedding) == model.embedding_dim
    )
    source = "precomputed" if stored else "computed"
    metrics.embedding_source.labels(source).inc()
    metrics.candidates.observe(len(req.candidates))
    # early-fusion rankers (DCAT) also read the sequence: one context pass, candidates cross-attend; the batcher
    # scores the requests waiting together (AFM_MODEL_CONCURRENCY passes at once)
    request_ts = None if before_us is None else before_us // _US  # passed on where the model takes it
    job = ScoreJob(
        ScoreRequest(
            np.asarray(user.embedding, dtype=np.float32) if stored else None,  # (D,)
            list(req.candidates),
            req.surface,
            content or None,
            sequence,
            request_ts,
        ),
        history=None if stored else history_before_day(sequence, request_s),  # what a published embedding holds
    )
    probs = np.asarray(state.batcher.score(model, job))  # (C, A)
    scored = time.perf_counter()
    admitted = job.started_at or fetched
    if probs.shape != (len(req.candidates), len(model.actions)):
        return error_response(500, f"model returned scores of shape {probs.shape}, expected ({len(req.candidates)}, A)")
    primary = model.actions.index(PRIMARY_ACTION) if PRIMARY_ACTION in model.actions else 0
    order = np.argsort(-probs[:, primary], kind="stable")  # (C,)
    ranked_ids = np.asarray(req.candidates, dtype=np.int64)[order].tolist()  # Python ints and floats in one go
    ranked_probs = probs[order].astype(np.float64).tolist()  # (C, A)
    actions = model.actions
    items = [
        {"item_id": item, "score": row[primary], "scores": dict(zip(actions, row, strict=True))}
        for item, row in zip(ranked_ids, ranked_probs, strict=True)
    ]
    return RankingJSONResponse(
        content={
            "model_version": model.version,
            "user_id": req.user_id,
            "surface": req.surface,
            "user_known": user.sequence is not None,
            "embedding_source": source,
            "realtime_events": realtime_events,
            "primary_action": model.actions[primary],
            "items": items,
        },
        headers={
            "Server-Timing": server_timing(
                features=fetched - started, queue=admitted - fetched, model=scored - admitted
            )
        },
    )
