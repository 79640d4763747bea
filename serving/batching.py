"""Scoring concurrent requests together: the requests queue, a worker takes every one waiting and scores them at once.

The service's request threads parse, read features and answer; only the worker thread runs
the model. When one request is in flight it is scored alone, at once (no waiting for company);
under load the requests that queued during one pass are scored in the next, as one batch:
their user embeddings that have to be computed in one backbone pass, then their candidates in
one ranker pass (:meth:`serving.model.ServingModel.score_many`). Fewer, larger passes do the
same work with less per-pass overhead, and the model never runs more passes at once than it
has workers (``AFM_MODEL_CONCURRENCY``), so concurrent requests do not split the cores.

Requests are batched only with requests for the same loaded model: a reload in the middle
never mixes versions in one pass. A request whose inputs are invalid fails alone.

Example::

    batcher = ModelBatcher(workers=1)
    probs = batcher.score(model, ScoreJob(ScoreRequest(embedding, candidates, "home", sequence=seq)))  # (C, A)
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from serving.model import ScoreRequest

log = logging.getLogger(__name__)

#: At most this many requests, and this many candidates in all, share one pass.
MAX_BATCH_REQUESTS = 16
MAX_BATCH_CANDIDATES = 8192


@dataclass
class ScoreJob:
    """One request for the model; with ``history``, its user embedding is computed from that sequence first.

    Attributes:
        request: what :meth:`serving.model.ServingModel.score` is given (``user_embedding`` None
            when ``history`` is given).
        history: the sequence whose user embedding the request reads (computed in the worker).
        started_at: when the worker took the job (``time.perf_counter``).
    """

    request: ScoreRequest
    history: dict | None = None
    started_at: float | None = None


class ModelBatcher:
    """Worker threads that score queued :class:`ScoreJob` s in batches.

    Args:
        workers: threads running the model (each one pass at a time).
        max_requests: most requests in one pass.
        max_candidates: most candidates in one pass (a request is never split).
    """

    def __init__(
        self, workers: int = 1, max_requests: int = MAX_BATCH_REQUESTS, max_candidates: int = MAX_BATCH_CANDIDATES
    ) -> None:
        if workers < 1 or max_requests < 1 or max_candidates < 1:
            raise ValueError(
                f"workers, max_requests and max_candidates must be ≥ 1, got {workers}, {max_requests}, {max_candidates}"
            )
        self.max_requests, self.max_candidates = max_requests, max_candidates
        self._queue: queue.SimpleQueue[tuple[Any, ScoreJob, Future]] = queue.SimpleQueue()
        self._held: tuple[Any, ScoreJob, Future] | None = None  # taken from the queue but not yet batched
        self._take = threading.Lock()
        self._workers = [threading.Thread(target=self._run, name=f"afm-model-{k}", daemon=True) for k in range(workers)]
        for t in self._workers:
            t.start()

    def score(self, model: Any, job: ScoreJob) -> np.ndarray:
        """(C, A) probabilities of ``job`` by ``model``; waits for its turn. Raises what scoring it raised."""
        done: Future = Future()
        self._queue.put((model, job, done))
        return done.result()

    # ------------------------------------------------------------------ worker
    def _next_batch(self) -> list[tuple[Any, ScoreJob, Future]]:
        """The oldest waiting job and every job waiting behind it for the same model, within the limits."""
        with self._take:
            first = self._held or self._queue.get()
            self._held = None
            batch, candidates = [first], len(first[1].request.candidates)
            while len(batch) < self.max_requests:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                n = len(item[1].request.candidates)
                if item[0] is not first[0] or candidates + n > self.max_candidates:
                    self._held = item  # another model (a reload) or too many candidates: the next batch
                    break
                batch.append(item)
                candidates += n
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            now = time.perf_counter()
            for _, job, _ in batch:
                job.started_at = now
            try:
                results = score_jobs(batch[0][0], [job for _, job, _ in batch])
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others: score them one by one
                if len(batch) == 1:
                    batch[0][2].set_exception(exc)
                else:
                    for item in batch:
                        self._finish_alone(item)
                continue
            for (_, _, done), probs in zip(batch, results, strict=True):
                done.set_result(probs)

    def _finish_alone(self, item: tuple[Any, ScoreJob, Future]) -> None:
        model, job, done = item
        try:
            done.set_result(score_jobs(model, [job])[0])
        except Exception as exc:  # noqa: BLE001 - the request's own error, raised in its thread
            done.set_exception(exc)


def takes(method: object, parameter: str) -> bool:
    """Whether ``method`` has ``parameter``: a feature reader's ``user`` may lack ``before_us``, a ranking
    model's ``score`` may lack ``request_ts`` (then it scores at now)."""
    try:
        return parameter in inspect.signature(method).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def score_jobs(model: Any, jobs: list[ScoreJob]) -> list[np.ndarray]:
    """Score ``jobs`` with ``model``: the embeddings they need in one pass, then one ``score_many`` (or ``score`` each)."""
    need = [j for j in jobs if j.history is not None]
    if need:
        computed = np.asarray(model.user_embeddings([j.history for j in need]))  # (U, D)
        for job, emb in zip(need, computed, strict=True):
            job.request, job.history = replace(job.request, user_embedding=emb), None
    requests = [j.request for j in jobs]
    score_many = getattr(model, "score_many", None)
    if score_many is not None:
        return score_many(requests)
    with_ts = takes(model.score, "request_ts")
    out = []
    for r in requests:  # a model without score_many (a test double, another implementation): one by one
        at = {"request_ts": r.request_ts} if with_ts and r.request_ts is not None else {}
        out.append(
            np.asarray(
                model.score(r.user_embedding, list(r.candidates), r.surface, r.content, sequence=r.sequence, **at)
            )
        )
    return out
