"""serving.batching: waiting requests share a pass, a bad one fails alone, two models never share one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import ModelBatcher, ScoreJob
from serving.model import ScoreRequest


class RecordingModel:
    """score_many: probability = candidate id / 100 (+ the embedding's first value); records each pass's size."""

    actions = ("click",)

    def __init__(self, version: str, pass_s: float = 0.05) -> None:
        self.version, self.pass_s = version, pass_s
        self.passes: list[int] = []
        self.embedded: list[int] = []

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray:
        self.embedded.append(len(sequences))
        return np.array([[len(s["item_ids"])] for s in sequences], dtype=np.float32)

    def score_many(self, requests) -> list[np.ndarray]:
        if any(r.surface == "attic" for r in requests):
            raise ValueError("unknown surface 'attic'")
        time.sleep(self.pass_s)
        self.passes.append(len(requests))
        return [np.asarray(r.candidates, np.float32)[:, None] / 100 + r.user_embedding[0] for r in requests]


def _job(candidates: list[int], surface: str = "home", history: dict | None = None) -> ScoreJob:
    embedding = None if history is not None else np.zeros(1, np.float32)
    return ScoreJob(ScoreRequest(embedding, candidates, surface), history=history)


def _concurrently(batcher: ModelBatcher, work: list[tuple[object, ScoreJob]]) -> list[object]:
    out: list[object] = [None] * len(work)

    def one(i: int) -> None:
        try:
            out[i] = batcher.score(*work[i])
        except Exception as exc:  # noqa: BLE001 - kept for the assertions
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join()
    return out


def test_requests_waiting_during_a_pass_are_scored_together_with_their_own_results() -> None:
    model = RecordingModel("v1")
    batcher = ModelBatcher(workers=1)
    history = {"item_ids": [1, 2, 3], "actions": ["click"] * 3, "surfaces": ["home"] * 3}
    work = [(model, _job([i, i + 1], history=history if i == 5 else None)) for i in range(10)]
    got = _concurrently(batcher, work)
    assert sum(model.passes) == 10 and len(model.passes) < 10  # batched
    assert max(model.passes) > 1
    for i, probs in enumerate(got):
        shift = 3.0 if i == 5 else 0.0  # job 5's embedding was computed from its history (3 events)
        np.testing.assert_allclose(probs, np.array([[i / 100], [(i + 1) / 100]]) + shift)
    assert sum(model.embedded) == 1


def test_one_invalid_request_fails_alone() -> None:
    model = RecordingModel("v1")
    batcher = ModelBatcher(workers=1)
    work = [(model, _job([1])), (model, _job([2], surface="attic")), (model, _job([3])), (model, _job([4]))]
    got = _concurrently(batcher, work)
    assert isinstance(got[1], ValueError) and "attic" in str(got[1])
    assert [float(np.asarray(g)[0, 0]) for i, g in enumerate(got) if i != 1] == pytest.approx([0.01, 0.03, 0.04])


def test_requests_for_two_loaded_models_never_share_a_pass() -> None:
    old, new = RecordingModel("v1"), RecordingModel("v2")
    batcher = ModelBatcher(workers=1)
    work = [(old if i < 4 else new, _job([i + 1])) for i in range(8)]
    got = _concurrently(batcher, work)
    assert sum(old.passes) == 4 and sum(new.passes) == 4
    assert all(np.asarray(g).shape == (1, 1) for g in got)


def test_the_candidate_limit_splits_batches() -> None:
    model = RecordingModel("v1")
    batcher = ModelBatcher(workers=1, max_candidates=5)
    _concurrently(batcher, [(model, _job([1, 2, 3])) for _ in range(6)])
    assert max(model.passes) == 1  # two requests of 3 candidates would exceed 5


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must be ≥ 1"):
        ModelBatcher(workers=0)
