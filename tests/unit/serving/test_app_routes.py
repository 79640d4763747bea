"""HTTP layer of the scoring service, with a tiny deterministic model and in-memory features."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from serving.app import MAX_CANDIDATES, UserRow, create_app


class TinyModel:
    """Test double of training.serving_model.ServingModel: embedding = [len(seq), sum(item_ids)]."""

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
    def __init__(self, users: dict[int, UserRow] | None = None, content: dict[int, list[float]] | None = None):
        self.users = users or {}
        self.content = content or {}
        self.fail = False

    def status(self) -> str:
        return "ok"

    def user(self, user_id: int) -> UserRow:
        if self.fail:
            raise ConnectionError("online store is down")
        return self.users.get(user_id, UserRow())

    def item_content(self, item_ids):
        return {i: self.content[i] for i in item_ids if i in self.content}


SEQ = {"item_ids": [5, 6], "actions": ["click", "save"], "surfaces": ["home", "home"]}


@pytest.fixture
def setup(tmp_path):
    model = TinyModel("r1")
    feats = MemoryFeatures(
        users={
            1: UserRow(sequence=SEQ, embedding=[10.0, 20.0], model_version="r1"),
            2: UserRow(sequence=SEQ, embedding=[10.0, 20.0], model_version="r0"),  # another version
        }
    )
    loaded = {"model": model}
    app = create_app(Layout(tmp_path), model_loader=lambda: loaded["model"], online_features=feats)
    return TestClient(app), model, feats, loaded


def _rank(client, **body):
    payload = {"user_id": 1, "candidates": [1, 2, 3, 4], "surface": "home", **body}
    return client.post("/v1/rank", json=payload)


def test_health_ok_with_model(setup):
    client, *_ = setup
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["model_version"] == "r1" and r.json()["feature_store"] == "ok"


def test_health_503_without_model(tmp_path):
    def no_model():
        raise FileNotFoundError("no ranker is promoted")

    client = TestClient(create_app(Layout(tmp_path), model_loader=no_model, online_features=MemoryFeatures()))
    r = client.get("/health")
    assert r.status_code == 503
    assert "no ranker is promoted" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 503
    r = _rank(client)
    assert r.status_code == 503 and "no model loaded" in r.json()["error"]


def test_rank_sorted_by_click_probability_with_all_actions(setup):
    client, model, *_ = setup
    r = _rank(client, candidates=[3, 10, 4, 1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "r1" and body["user_id"] == 1 and body["surface"] == "home"
    ids = [it["item_id"] for it in body["items"]]
    scores = [it["score"] for it in body["items"]]
    assert sorted(ids) == [1, 3, 4, 10]
    assert scores == sorted(scores, reverse=True)
    assert ids[0] == 4  # 4 % 7 - 3 = 1 is the largest logit
    for it in body["items"]:
        assert set(it["scores"]) == {"click", "save", "hide"}
        assert it["score"] == it["scores"]["click"]


def test_precomputed_embedding_used_only_for_the_same_version(setup):
    client, model, *_ = setup
    r = _rank(client, user_id=1)
    assert r.json()["embedding_source"] == "precomputed" and r.json()["user_known"] is True
    np.testing.assert_allclose(model.scored_with[-1], [10.0, 20.0])
    assert model.embedded == []

    r = _rank(client, user_id=2)  # stored embedding is from r0; model is r1
    assert r.json()["embedding_source"] == "computed" and r.json()["user_known"] is True
    assert model.embedded[-1] == [SEQ]
    np.testing.assert_allclose(model.scored_with[-1], [2.0, 11.0])


def test_unknown_user_gets_empty_sequence(setup):
    client, model, *_ = setup
    r = _rank(client, user_id=999)
    assert r.status_code == 200
    assert r.json()["user_known"] is False and r.json()["embedding_source"] == "computed"
    assert model.embedded[-1] == [{"item_ids": [], "actions": [], "surfaces": []}]


def test_item_content_from_store_is_passed_to_the_model(tmp_path):
    feats = MemoryFeatures(content={2: [0.1, 0.2]})
    client = TestClient(create_app(Layout(tmp_path), model_loader=lambda: TinyModel(), online_features=feats))
    r = _rank(client, candidates=[1, 2, 3])
    assert r.json()["items"][0]["item_id"] == 2


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"candidates": []}, "candidates must hold 1 to 2000 item ids, got 0"),
        ({"candidates": list(range(MAX_CANDIDATES + 1))}, "got 2001"),
        ({"candidates": [1, 1]}, "duplicate"),
        ({"candidates": ["a"]}, "candidates.0"),
        ({"surface": "moon"}, "surface must be one of"),
        ({"user_id": "7"}, "user_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_requests_are_422_with_a_clear_message(setup, body, needle):
    client, *_ = setup
    r = _rank(client, **body)
    assert r.status_code == 422
    assert needle in r.json()["error"], r.json()


def test_missing_field_is_422(setup):
    client, *_ = setup
    r = client.post("/v1/rank", json={"user_id": 1, "surface": "home"})
    assert r.status_code == 422 and "candidates" in r.json()["error"]


def test_feature_store_down_is_503(setup):
    client, _, feats, _ = setup
    feats.fail = True
    r = _rank(client)
    assert r.status_code == 503 and "online store is down" in r.json()["error"]


def test_admin_reload_auth(setup, monkeypatch):
    client, _, _, loaded = setup
    monkeypatch.delenv("AFM_ADMIN_TOKEN", raising=False)
    assert client.post("/admin/reload").status_code == 503

    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")
    assert client.post("/admin/reload").status_code == 403
    assert client.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/admin/reload", headers={"Authorization": "Basic s3cret"}).status_code == 403

    loaded["model"] = TinyModel("r2")
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"reloaded": True, "model_version": "r2", "previous": "r1"}
    assert client.get("/health").json()["model_version"] == "r2"
    # user 1's stored embedding is r1's: after the reload it must not be used
    assert _rank(client, user_id=1).json()["embedding_source"] == "computed"


def test_admin_reload_failure_keeps_the_old_model(setup, monkeypatch):
    client, _, _, loaded = setup
    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")

    def boom():
        raise RuntimeError("corrupt artifact")

    client.app.state.afm.loader = boom
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 500 and "corrupt artifact" in r.json()["error"]
    assert client.get("/health").json()["model_version"] == "r1"


def test_metrics_count_requests_by_route(setup):
    client, *_ = setup
    _rank(client)
    _rank(client, candidates=[])
    text = client.get("/metrics").text
    assert 'afm_http_requests_total{method="POST",route="/v1/rank",status="200"} 1.0' in text
    assert 'afm_http_requests_total{method="POST",route="/v1/rank",status="422"} 1.0' in text
    assert 'afm_http_request_seconds_count{route="/v1/rank"} 2.0' in text
    assert 'afm_rank_embedding_source_total{source="precomputed"} 1.0' in text
