"""A ranker exported with quantized item tables (``afm model export --quantize``) loads in the service and serves
scores close to its float source; the service's routes serve it unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from features.config import Layout
from serving.app import create_app
from serving.model import ServingModel, load_ranker
from serving.online_features import UserRow
from training.jobs.export import export_quantized
from training.jobs.registry import promote, save_artifact
from training.model.backbone import PinFMConfig
from training.model.quantize import QuantizedEmbedding, item_tables
from training.model.ranker import NewItemConfig, Ranker, RankerConfig

BACKBONE = PinFMConfig(d_model=32, n_layers=2, n_heads=4, max_len=12, hash_buckets=1 << 12)
SEQ = {
    "item_ids": [11, 12, 13, 14, 15],
    "actions": ["click", "save", "click", "share", "click"],
    "surfaces": ["home", "home", "search", "home", "home"],
}
CANDIDATES = list(range(100, 164))
#: largest |p_quantized - p_fp32| of any candidate and action through ServingModel.score
PROB_TOLERANCE = {"int8": 0.002, "int4": 0.02}
#: largest ‖e_quantized - e_fp32‖ / ‖e_fp32‖ of the user embedding computed by the quantized model
EMBEDDING_TOLERANCE = {"int8": 0.02, "int4": 0.2}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, str]:
    """A float ranker (item tables scaled up from their init, so quantization has work to do), promoted."""
    layout = Layout(tmp_path_factory.mktemp("quantized_registry"))
    torch.manual_seed(0)
    cfg = RankerConfig(backbone=BACKBONE, new_items=NewItemConfig.off())
    ranker = Ranker(cfg)
    with torch.no_grad():
        for tab in ranker.backbone.items.tables:
            tab.weight.mul_(10)
    version = save_artifact(layout, "ranker", ranker.state_dict(), {"ranker": cfg.to_dict()}, {}, {})
    promote(layout, version)
    return layout, version


@pytest.mark.parametrize(("fmt", "user"), [("int8", "int8"), ("int4", "fp32"), ("int4", "int4")])
def test_an_exported_version_loads_quantized_and_scores_close_to_its_source(
    registry: tuple[Layout, str], fmt: str, user: str
) -> None:
    layout, source = registry
    out = export_quantized(layout, quantize=fmt, user_embeddings=user, evaluate_day=False)
    served = load_ranker(layout, out["version"])
    fp32 = load_ranker(layout, source)
    assert served.version == out["version"] and fp32.user_embedding_bits is None
    assert served.user_embedding_bits == {"int8": 8, "int4": 4, "fp32": None}[user]
    tables = item_tables(served.ranker)
    assert len(tables) == 2 and all(
        isinstance(t, QuantizedEmbedding) and t.bits == out["bits"] for t in tables.values()
    )
    emb = fp32.user_embeddings([SEQ])[0]
    # its sequence's items are the quantized rows: the user embedding moves by a small share of its length
    rel = np.linalg.norm(served.user_embeddings([SEQ])[0] - emb) / np.linalg.norm(emb)
    assert 0 < rel < EMBEDDING_TOLERANCE[fmt], rel
    p = fp32.score(emb, CANDIDATES, "home", sequence=SEQ)
    q = served.score(emb, CANDIDATES, "home", sequence=SEQ)
    diff = np.abs(p - q).max()
    assert 0 < diff < PROB_TOLERANCE[fmt], diff
    # the fallback (no stored embedding) runs on the quantized model as well
    assert np.isfinite(served.score(None, CANDIDATES, "home", sequence=SEQ)).all()


def test_a_float_artifact_is_served_as_before(registry: tuple[Layout, str]) -> None:
    layout, source = registry
    served = load_ranker(layout, source)
    assert all(isinstance(t, torch.nn.Embedding) for t in item_tables(served.ranker).values())


def test_the_service_ranks_with_the_quantized_version(registry: tuple[Layout, str], fakes) -> None:
    layout, _ = registry
    out = export_quantized(layout, quantize="int8", evaluate_day=False)
    promote(layout, out["version"])
    model: ServingModel = load_ranker(layout)  # CURRENT: the exported version
    stored = model.user_embeddings([SEQ])[0].tolist()
    rows = {
        1: UserRow(sequence=SEQ, embedding=stored, model_version=out["version"]),
        2: UserRow(sequence=SEQ, embedding=stored, model_version=out["source_version"]),  # the float source's
    }
    app = create_app(
        layout,
        model_loader=lambda: model,
        online_features=fakes.MemoryFeatures(users=rows),
        warm_up_in_background=False,
    )
    client = TestClient(app)
    got = {}
    for user_id in rows:
        r = client.post("/v1/rank", json={"user_id": user_id, "candidates": CANDIDATES, "surface": "home"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == out["version"]
        got[user_id] = body["embedding_source"]
        expect = model.score(stored, CANDIDATES, "home", sequence=SEQ)
        if user_id == 1:  # the stored embedding of the served version is used: the same scores
            by_id = {it["item_id"]: it["scores"]["click"] for it in body["items"]}
            np.testing.assert_allclose([by_id[c] for c in CANDIDATES], expect[:, 0], atol=1e-6)
    assert got == {1: "precomputed", 2: "computed"}  # the version guard: the float source's embedding is not used
