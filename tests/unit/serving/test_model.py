"""serving.model.ServingModel with the default (hybrid) ranker: the stored user embedding matters, the fallback
computes what the scores use, and the service's version guard therefore changes the scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from features.config import Layout
from serving.app import create_app
from serving.model import ServingModel, history_before_day
from serving.online_features import UserRow
from training.model.backbone import PinFMConfig
from training.model.ranker import SEQUENCE_MODES, NewItemConfig, Ranker, RankerConfig

BACKBONE = PinFMConfig(d_model=32, n_layers=2, n_heads=4, max_len=12, hash_buckets=1 << 16)
T0 = 1_767_600_000  # unix seconds
SEQ = {
    "item_ids": [11, 12, 13, 14, 15],
    "actions": ["click", "save", "click", "share", "click"],
    "surfaces": ["home", "home", "search", "home", "home"],
    "ts": [T0, T0 + 30, T0 + 3_600, T0 + 2 * 86_400, T0 + 2 * 86_400 + 90],
}
CANDIDATES = [21, 22, 23, 24]


def _model(sequence: str | None = None, version: str = "v1") -> ServingModel:
    torch.manual_seed(0)
    cfg = RankerConfig(backbone=BACKBONE, new_items=NewItemConfig.off())  # the default sequence module
    if sequence is not None:
        cfg = cfg.replace(sequence=sequence)
    return ServingModel(Ranker(cfg), version)


def _block_passes(model: ServingModel) -> list[int]:
    """A counter of the backbone's first-block passes (every backbone, context or crossing pass runs it once)."""
    calls = [0]
    model.ranker.backbone.blocks[0].ln1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_default_rankers_scores_depend_on_the_stored_user_embedding() -> None:
    model = _model()
    assert model.ranker.cfg.sequence == "hybrid" and model.uses_user_embedding
    D = model.embedding_dim
    zeros = model.score(np.zeros(D, np.float32), CANDIDATES, "home", sequence=SEQ)
    ones = model.score(np.ones(D, np.float32), CANDIDATES, "home", sequence=SEQ)
    assert np.abs(zeros - ones).min() > 1e-5  # every candidate, every action


def test_the_fallback_equals_the_precomputed_path_and_runs_one_context_pass() -> None:
    model = _model()
    stored = model.user_embeddings([SEQ])[0]  # (D,) what publish-embeddings stores for this sequence
    precomputed = model.score(stored, CANDIDATES, "home", sequence=SEQ)
    calls = _block_passes(model)
    fallback = model.score(None, CANDIDATES, "home", sequence=SEQ)
    assert calls[0] == 2  # one context pass (it gives the user vector too) and one crossing pass
    np.testing.assert_allclose(fallback, precomputed, atol=1e-6, rtol=0)
    calls[0] = 0
    model.score(stored, CANDIDATES, "home", sequence=SEQ)
    assert calls[0] == 2  # with the stored embedding: the context pass (cache only) and the crossing pass
    # a request on the day of the last two events: the embedding published that day did not hold them
    day = T0 + 2 * 86_400 + 3_600
    history = history_before_day(SEQ, day)
    assert history["item_ids"] == SEQ["item_ids"][:3] and history["ts"] == SEQ["ts"][:3]
    published = model.user_embeddings([history])[0]
    calls[0] = 0
    fallback = model.score(None, CANDIDATES, "home", sequence=SEQ, request_ts=day)
    assert calls[0] == 3  # the history's pass, the sequence's context pass and the crossing pass: all read
    np.testing.assert_allclose(
        fallback, model.score(published, CANDIDATES, "home", sequence=SEQ, request_ts=day), atol=1e-6, rtol=0
    )
    assert np.abs(fallback - model.score(stored, CANDIDATES, "home", sequence=SEQ, request_ts=day)).max() > 1e-6
    # a new user: both paths agree too
    empty = {"item_ids": [], "actions": [], "surfaces": []}
    np.testing.assert_allclose(
        model.score(None, CANDIDATES, "home", sequence=empty),
        model.score(model.user_embeddings([empty])[0], CANDIDATES, "home", sequence=empty),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("mode", SEQUENCE_MODES)
def test_user_embeddings_compute_only_what_the_scores_read(mode: str) -> None:
    model = _model(mode)
    calls = _block_passes(model)
    emb = model.user_embeddings([SEQ, SEQ])
    assert emb.shape == (2, model.embedding_dim)
    if model.uses_user_embedding:
        assert mode in ("pinfm_late", "hybrid") and calls[0] == 1 and np.abs(emb).max() > 0
        D = model.embedding_dim
        a = model.score(np.zeros(D, np.float32), CANDIDATES, "home", sequence=SEQ)
        b = model.score(np.ones(D, np.float32), CANDIDATES, "home", sequence=SEQ)
        assert np.abs(a - b).max() > 1e-5
        np.testing.assert_allclose(
            model.score(None, CANDIDATES, "home", sequence=SEQ),
            model.score(emb[0], CANDIDATES, "home", sequence=SEQ),
            atol=1e-6,
            rtol=0,
        )
    else:  # the scores never read it: no model pass, and any embedding scores the same
        assert calls[0] == 0 and not emb.any()
        D = model.embedding_dim
        a = model.score(np.zeros(D, np.float32), CANDIDATES, "home", sequence=SEQ)
        np.testing.assert_array_equal(a, model.score(np.ones(D, np.float32), CANDIDATES, "home", sequence=SEQ))
        np.testing.assert_array_equal(a, model.score(None, CANDIDATES, "home", sequence=SEQ))


class _Features:
    """Online features of three users with the same sequence and different stored embeddings."""

    def __init__(self, rows: dict[int, UserRow]) -> None:
        self.rows = rows

    def status(self) -> str:
        return "ok"

    def user(self, user_id: int) -> UserRow:
        return self.rows.get(user_id, UserRow())

    def item_content(self, item_ids) -> dict[int, list[float]]:
        return {}


def test_the_service_scores_with_the_stored_embedding_of_its_own_version_only(tmp_path) -> None:
    """Through POST /v1/rank: the stored embedding moves the scores; one of another version is recomputed."""
    model = _model(version="v1")
    D = model.embedding_dim
    published = model.user_embeddings([SEQ])[0].tolist()  # what publish-embeddings stored for v1
    rows = {
        1: UserRow(sequence=SEQ, embedding=[0.0] * D, model_version="v1"),
        2: UserRow(sequence=SEQ, embedding=[1.0] * D, model_version="v1"),
        3: UserRow(sequence=SEQ, embedding=[1.0] * D, model_version="v0"),  # stale: another model version
        4: UserRow(sequence=SEQ, embedding=published, model_version="v1"),
    }
    app = create_app(Layout(tmp_path), model_loader=lambda: model, online_features=_Features(rows),
                     warm_up_in_background=False)  # fmt: skip
    client = TestClient(app)

    def scores(user_id: int) -> tuple[str, dict[int, dict]]:
        r = client.post("/v1/rank", json={"user_id": user_id, "candidates": CANDIDATES, "surface": "home"})
        assert r.status_code == 200, r.text
        return r.json()["embedding_source"], {it["item_id"]: it["scores"] for it in r.json()["items"]}

    src1, zeros = scores(1)
    src2, ones = scores(2)
    src3, stale = scores(3)
    src4, right = scores(4)
    assert (src1, src2, src3, src4) == ("precomputed", "precomputed", "computed", "precomputed")
    assert max(abs(zeros[i]["click"] - ones[i]["click"]) for i in CANDIDATES) > 1e-5
    for i in CANDIDATES:  # the stale embedding is not used: the computed one = the one published for v1
        for action, p in right[i].items():
            assert stale[i][action] == pytest.approx(p, abs=1e-6)
    assert max(abs(stale[i]["click"] - ones[i]["click"]) for i in CANDIDATES) > 1e-5


@pytest.mark.parametrize("sequence", ["hybrid", "pinfm_early", "transact", "pinfm_late"])
def test_score_many_gives_each_request_the_scores_of_score(sequence: str) -> None:
    """Requests batched into one ranker pass (padded sequences and candidates) score as they do alone."""
    from serving.model import ScoreRequest

    model = _model(sequence)
    D = model.embedding_dim
    rng = np.random.default_rng(0)
    short = {k: v[:2] for k, v in SEQ.items()}
    no_ts = {k: v for k, v in SEQ.items() if k != "ts"}
    empty = {"item_ids": [], "actions": [], "surfaces": []}
    requests = [
        ScoreRequest(rng.normal(size=D).astype(np.float32), CANDIDATES, "home", sequence=SEQ),
        ScoreRequest(rng.normal(size=D).astype(np.float32), [31, 32], "search", sequence=short),  # fewer of both
        ScoreRequest(None, CANDIDATES[:3], "home", sequence=SEQ, request_ts=T0 + 2 * 86_400 + 3_600),
        ScoreRequest(None, [41, 42, 43, 44, 45, 46], "home", sequence=short),
        ScoreRequest(rng.normal(size=D).astype(np.float32), CANDIDATES, "home", sequence=no_ts),
        ScoreRequest(rng.normal(size=D).astype(np.float32), [51], "related", sequence=empty),
        ScoreRequest(None, CANDIDATES, "home", sequence=None, request_ts=T0),
        ScoreRequest(rng.normal(size=D).astype(np.float32), [], "home", sequence=SEQ),
        ScoreRequest(rng.normal(size=D).astype(np.float32), [24, 23, 22], "home", sequence=SEQ),
    ]
    calls = _block_passes(model)
    batched = model.score_many(requests)
    passes = calls[0]
    calls[0] = 0
    alone = [
        model.score(r.user_embedding, r.candidates, r.surface, r.content, sequence=r.sequence, request_ts=r.request_ts)
        for r in requests
    ]
    assert len(batched) == len(requests)
    for got, want in zip(batched, alone, strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    if sequence in ("hybrid", "pinfm_early"):  # DCAT: fewer backbone passes than one request at a time
        assert passes < calls[0]


def test_score_many_names_the_invalid_request() -> None:
    from serving.model import ScoreRequest

    model = _model()
    ok = ScoreRequest(None, CANDIDATES, "home", sequence=SEQ)
    with pytest.raises(Exception, match="unknown surface 'attic'"):
        model.score_many([ok, ScoreRequest(None, CANDIDATES, "attic", sequence=SEQ)])
