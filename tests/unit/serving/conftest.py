"""Test doubles of the scoring service's model and online features, shared by the serving unit tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest

from serving.online_features import UserRow


class TinyModel:
    """Test double of serving.model.ServingModel: embedding = [len(seq), sum(item_ids)]."""

    actions = ("click", "save", "hide")
    embedding_dim = 2

    def __init__(self, version: str = "r1") -> None:
        self.version = version
        self.embedded: list[list[dict]] = []
        self.scored_with: list[np.ndarray] = []

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray:
        self.embedded.append(sequences)
        return np.array([[len(s["item_ids"]), sum(s["item_ids"])] for s in sequences], dtype=np.float32)  # (U, 2)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None) -> np.ndarray:
        self.scored_with.append(np.asarray(user_embedding))
        ids = np.asarray(candidates, dtype=np.float64)  # (C,)
        click = 1.0 / (1.0 + np.exp(-(ids % 7 - 3)))  # (C,)
        if content:
            click = np.array([0.99 if c in content else p for c, p in zip(candidates, click, strict=True)])
        return np.stack([click, click / 2, 1 - click], axis=1).astype(np.float32)  # (C, 3)


class MemoryFeatures:
    """In-memory OnlineFeatures; ``warm_up`` counts its calls, waits for ``release`` and raises ``warm_up_error``."""

    def __init__(self, users: dict[int, UserRow] | None = None, content: dict[int, list[float]] | None = None):
        self.users = users or {}
        self.content = content or {}
        self.fail = False
        self.reads = 0
        self.warm_ups = 0
        self.release = threading.Event()
        self.release.set()  # warm-up returns at once unless a test clears it
        self.warm_up_error: Exception | None = None

    def status(self) -> str:
        return "ok"

    def warm_up(self) -> None:
        self.warm_ups += 1
        if not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the warm-up")
        if self.warm_up_error is not None:
            raise self.warm_up_error

    def user(self, user_id: int) -> UserRow:
        self.reads += 1
        if self.fail:
            raise ConnectionError("online store is down")
        return self.users.get(user_id, UserRow())

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        return {i: self.content[i] for i in item_ids if i in self.content}


class FeaturesWithoutWarmUp:
    """An OnlineFeatures written before ``warm_up`` existed: the service must still start and serve with it."""

    def status(self) -> str:
        return "ok"

    def user(self, user_id: int) -> UserRow:
        return UserRow()

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        return {}


SEQ = {"item_ids": [5, 6], "actions": ["click", "save"], "surfaces": ["home", "home"]}


@pytest.fixture(scope="session")
def fakes() -> SimpleNamespace:
    """The doubles above as one fixture (test modules should not import conftest)."""
    return SimpleNamespace(
        TinyModel=TinyModel, MemoryFeatures=MemoryFeatures, FeaturesWithoutWarmUp=FeaturesWithoutWarmUp, SEQ=SEQ
    )
