"""What the service holds while it runs: the loaded ranker, the feature reader, readiness, and its metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import values as prom_values

from features.config import Layout
from features.contract import MIN_ID, SURFACES
from serving.batching import ModelBatcher
from serving.online_features import OnlineFeatures
from serving.schemas import describe

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------- state
EMPTY_SEQUENCE: dict[str, list] = {"item_ids": [], "actions": [], "surfaces": []}


def score_one_pass(model: RankingModel) -> None:
    """One scoring pass (an unknown user, one candidate), so that lazy set-up happens before traffic."""
    embedding = model.user_embeddings([dict(EMPTY_SEQUENCE)])[0]  # (U=1, D) → (D,)
    probs = np.asarray(model.score(embedding, [MIN_ID], SURFACES[0], None, sequence=dict(EMPTY_SEQUENCE)))
    if probs.shape != (1, len(model.actions)):
        raise ValueError(
            f"warm-up: the model returned scores of shape {probs.shape}, expected (1, {len(model.actions)})"
        )


#: How many model passes may run at once (env AFM_MODEL_CONCURRENCY): the batcher's workers. Requests that
#: arrive during a pass wait and are scored together in the next one (serving.batching).
MODEL_CONCURRENCY_ENV = "AFM_MODEL_CONCURRENCY"
#: Threads each model pass may use (env AFM_TORCH_THREADS; torch's intra-op threads), set by ``afm serve``.
TORCH_THREADS_ENV = "AFM_TORCH_THREADS"


def model_concurrency() -> int:
    """``AFM_MODEL_CONCURRENCY`` (default 1: one model pass at a time, with every core it is given, batching
    the requests that wait).

    Raises:
        ValueError: when it is not a whole number ≥ 1.
    """
    raw = os.environ.get(MODEL_CONCURRENCY_ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MODEL_CONCURRENCY_ENV} must be a whole number ≥ 1, got {raw!r}")
    return value


@dataclass
class ServiceState:
    layout: Layout
    loader: Callable[[], RankingModel]
    features: OnlineFeatures
    model: RankingModel | None = None
    load_error: str | None = None  # the last load's failure: at start (no model) or a reload (old model kept)
    warm_up_error: str | None = None
    warmed: threading.Event = field(default_factory=threading.Event)
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: ModelBatcher = field(default_factory=lambda: ModelBatcher(workers=model_concurrency()))

    def load(self, *, score_once: bool) -> None:
        """Load the ranker (and with ``score_once`` run one scoring pass); the served model changes only on success."""
        try:
            model = self.loader()
            if score_once:
                score_one_pass(model)
        except Exception as exc:  # any failure: keep serving the old model, report why
            self.load_error = describe(exc)
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
                score_one_pass(model)
        except Exception as exc:  # noqa: BLE001 - requests open the store again; /health reports it
            self.warm_up_error = describe(exc)
            log.warning("warm-up failed (serving anyway): %s", self.warm_up_error)
        finally:
            self.warmed.set()
        log.info("warm-up finished in %.2f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.warmed.is_set()


class ServiceMetrics:
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


def default_loader(layout: Layout) -> Callable[[], RankingModel]:
    def load() -> RankingModel:
        from serving.model import load_ranker

        return load_ranker(layout)

    return load
