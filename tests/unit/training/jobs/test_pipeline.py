"""Pretrain → fine-tune → registry → serving model, on a tiny synthetic world (tiny configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.config import Layout
from features.contract import ACTION_IDS, LABEL_ACTIONS, SURFACE_IDS, ContractError
from serving.model import load_ranker
from training.data import ContentTable, read_partition
from training.jobs.finetune import FinetuneConfig, finetune
from training.jobs.pretrain import PretrainConfig, pretrain
from training.jobs.registry import current_version, list_versions, load_artifact
from training.model.ranker import Ranker, RankerConfig

FT = FinetuneConfig(model="tiny", epochs=2, batch_size=128, device="cpu")


@pytest.fixture(scope="module")
def trained(world: Layout) -> dict:
    pre = pretrain(world, PretrainConfig.preset("tiny").replace(device="cpu"))
    ft = finetune(world, FT)
    return {"pre": pre, "ft": ft}


def test_pretrain_loss_goes_down_and_artifact_exists(world: Layout, trained: dict) -> None:
    pre = trained["pre"]
    assert pre["final_loss"] < pre["first_loss"] - 0.2
    assert pre["steps"] == PretrainConfig.preset("tiny").steps and pre["tokens_per_s"] > 0
    d = world.models / "pinfm" / pre["version"]
    for name in ("model.pt", "config.json", "metrics.json", "data_version.json", "metrics.jsonl", "training_curve.png"):
        assert (d / name).is_file()
    assert not world.runs.exists() or not any(world.runs.iterdir())  # finished run: checkpoint dir removed
    art = load_artifact(world, "pinfm", pre["version"])
    assert art["data_version"]["corpus_ds"] == "2026-01-03"


def test_finetune_beats_chance_and_is_promoted(world: Layout, trained: dict) -> None:
    ft = trained["ft"]
    assert ft["metrics"]["auc_click"] > 0.6
    assert ft["metrics"]["n_train"] > 0 and ft["metrics"]["n_eval"] > 0
    assert 0.0 <= ft["metrics"]["hit3_click"] <= 1.0
    # sliced by items created after the backbone's pretraining data: here the corpus day is the eval
    # day itself, so no item is new (the demo pretrains on the day before and has new items)
    assert ft["metrics"]["n_eval_new"] == 0
    assert {"auc_click_new", "auc_click_old", "hit3_save_new", "hit3_save_old"} <= set(ft["metrics"])
    assert ft["backbone_version"] == trained["pre"]["version"]
    assert ft["promoted"] and current_version(world) == ft["version"]
    art = load_artifact(world, "ranker", ft["version"])
    assert art["data_version"]["train_days"] == ["2026-01-01", "2026-01-02"]
    assert art["data_version"]["eval_day"] == "2026-01-03"
    assert art["data_version"]["backbone_version"] == trained["pre"]["version"]
    assert art["data_version"]["new_item_cutoff"].startswith("2026-01-04")  # end of the corpus day 2026-01-03
    assert (art["path"] / "gate.json").is_file()
    # time gaps: pretrained with them (the default), so the ranker feeds them too
    assert load_artifact(world, "pinfm", trained["pre"]["version"])["config"]["pretrain"]["time_gaps"] is True
    assert art["config"]["finetune"]["time_gaps"] is None and art["config"]["ranker"]["time_gaps"] is True


def test_serving_model_matches_ranker_forward(world: Layout, trained: dict) -> None:
    sm = load_ranker(world)
    assert sm.version == trained["ft"]["version"] and sm.actions == LABEL_ACTIONS
    seqs = read_partition(world.request_sequences, "2026-01-03").head(3)
    sequences = [
        {"item_ids": list(r.item_ids), "actions": list(r.actions), "surfaces": list(r.surfaces)}
        for r in seqs.itertuples()
    ]
    sequences.append({"item_ids": [], "actions": [], "surfaces": []})  # a brand-new user
    emb = sm.user_embeddings(sequences)
    assert emb.shape == (4, sm.embedding_dim) and np.isfinite(emb).all()
    cands = [int(x) for x in read_partition(world.ranking_examples, "2026-01-03")["item_id"].iloc[:5]] + [424242]
    probs = sm.score(emb[0], cands, "search", sequence=sequences[0])
    assert probs.shape == (6, len(LABEL_ACTIONS)) and ((probs > 0) & (probs < 1)).all()
    assert sm.ranker.cfg.sequence == "pinfm_early"  # the default: DCAT early fusion reads the sequence
    assert not np.allclose(sm.score(emb[0], cands, "search", sequence=sequences[-1]), probs)  # a new user

    # the same numbers from the plain Ranker forward on hand-built tensors
    art = load_artifact(world, "ranker", sm.version)
    ranker = Ranker(RankerConfig.from_dict(art["config"]["ranker"]))
    ranker.load_state_dict(art["state_dict"])
    ranker.eval()
    max_len = ranker.cfg.backbone.max_len - 1  # early fusion keeps the last position for the candidate
    s = sequences[0]
    items = torch.tensor([s["item_ids"][-max_len:]])
    content = ContentTable.from_layout(world)
    seq = {
        "item_ids": items,
        "action_ids": torch.tensor([[ACTION_IDS[a] for a in s["actions"][-max_len:]]]),
        "surface_ids": torch.tensor([[SURFACE_IDS[x] for x in s["surfaces"][-max_len:]]]),
        "content": torch.from_numpy(content.lookup(items.numpy())),
        "pad_mask": torch.ones_like(items, dtype=torch.bool),
    }
    with torch.no_grad():
        logits = ranker(
            seq,
            torch.tensor([cands]),
            torch.full((1, len(cands)), SURFACE_IDS["search"]),
            torch.from_numpy(content.lookup(np.array([cands]))),
        )  # (1, C, A)
    np.testing.assert_allclose(torch.sigmoid(logits[0]).numpy(), probs, rtol=1e-5, atol=1e-6)

    # content passed at request time is used for the candidate
    new_vec = [3.0] * content.dim
    new_probs = sm.score(emb[0], [424242], "search", {424242: new_vec}, sequence=sequences[0])
    assert not np.allclose(new_probs, probs[-1:])
    with pytest.raises(ContractError, match="unknown surface 'tv'"):
        sm.score(emb[0], cands, "tv")
    with pytest.raises(ContractError, match="unknown action 'like'"):
        sm.user_embeddings([{"item_ids": [1], "actions": ["like"], "surfaces": ["home"]}])


def test_gate_keeps_the_better_model_and_list_shows_it(world: Layout, trained: dict) -> None:
    before = current_version(world)
    worse = finetune(world, FT.replace(epochs=1, lr=1e-6), backbone="none")
    assert worse["metrics"]["auc_click"] < trained["ft"]["metrics"]["auc_click"] - 0.01
    assert not worse["promoted"] and worse["gate"]["pass"] is False
    assert current_version(world) == before
    rows = list_versions(world)
    assert [r["version"] for r in rows] == [trained["ft"]["version"], worse["version"]]
    assert [r["current"] for r in rows] == [True, False]


def test_bad_arguments_name_the_problem(world: Layout, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ds=2027-01-01"):
        finetune(world, FT, ds="2027-01-01")
    with pytest.raises(ValueError, match="at least one day before"):
        finetune(world, FT, ds="2026-01-01")
    with pytest.raises(FileNotFoundError, match="pretrain_corpus"):
        pretrain(Layout(tmp_path), PretrainConfig.preset("tiny"))
    with pytest.raises(ValueError, match="unknown PretrainConfig fields \\['stepz'\\]"):
        PretrainConfig().replace(stepz=3)
