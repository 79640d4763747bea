"""Pretrain → fine-tune → registry → serving model, on a tiny synthetic world (tiny configs)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from features.config import Layout
from features.contract import ACTION_IDS, LABEL_ACTIONS, SURFACE_IDS, ContractError
from serving.model import load_ranker
from training.bench.pretrain_retrieval import HeldOutDay, pretrain_retrieval
from training.data import ContentTable, read_partition
from training.jobs.finetune import FinetuneConfig, _resolve_backbone, finetune
from training.jobs.pretrain import PretrainConfig, pretrain
from training.jobs.registry import current_version, list_versions, load_artifact, save_artifact
from training.model.backbone import PinFMConfig
from training.model.inputs import history_len
from training.model.ranker import Ranker, RankerConfig
from training.model.recipes import recipe

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
    assert sm.ranker.cfg.sequence == "hybrid"  # the default: DCAT over the sequence + the user embedding
    assert sm.uses_user_embedding and np.abs(emb[0] - emb[-1]).max() > 1e-4  # a history vs none
    assert not np.allclose(sm.score(emb[0], cands, "search", sequence=sequences[-1]), probs)  # a new user

    # the same numbers from the plain Ranker forward on hand-built tensors
    art = load_artifact(world, "ranker", sm.version)
    ranker = Ranker(RankerConfig.from_dict(art["config"]["ranker"]))
    ranker.load_state_dict(art["state_dict"])
    ranker.eval()
    max_len = history_len(ranker.cfg)  # early fusion keeps the last position for the candidate
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
    with pytest.raises(FileNotFoundError, match="at least one day before"):  # nothing to do yet: the DAG skips
        finetune(world, FT, ds="2026-01-01")
    with pytest.raises(FileNotFoundError, match="pretrain_corpus"):
        pretrain(Layout(tmp_path), PretrainConfig.preset("tiny"))
    with pytest.raises(ValueError, match="unknown PretrainConfig fields \\['stepz'\\]"):
        PretrainConfig().replace(stepz=3)


# ------------------------------------------------------------------ the recipe and held-out retrieval
def test_every_pretrain_preset_builds_its_objective_from_the_recipe() -> None:
    r = recipe()
    for name in ("tiny", "small", "base"):
        cfg = PretrainConfig.preset(name)
        obj = cfg.objective()
        assert cfg.recipe == r.name and r.departures(obj) == {}, name  # dot, popularity + log-Q, L' = 3, …
        assert (obj.similarity, obj.sampler, obj.logq_correction, obj.multi_token_window) == (
            "dot",
            "popularity",
            True,
            3,
        )
        assert obj.in_batch_max <= r.objective.in_batch_max and obj.multi_token > 0, name
        assert (cfg.lr, cfg.weight_decay) == (r.lr, r.weight_decay), name
        assert cfg.backbone_config() == PinFMConfig.preset(cfg.model)
    assert PretrainConfig() == PretrainConfig.preset("small")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        PretrainConfig.preset("small", "nope")


def _add_held_out_day(layout: Layout, ds: str = "2026-01-04") -> dict[int, int]:
    """user_sequences of the corpus day (each user's segments joined) and valid events of ``ds``.

    Each user of the world: an impression, a hide, then a click (the target: an item of the
    category the user acted on most), then a save. One more user has events but no history.
    Returns {user_id: target item}.
    """
    corpus = read_partition(layout.pretrain_corpus, "2026-01-03").sort_values(["user_id", "segment"])
    seqs = corpus.groupby("user_id", sort=True).agg(
        {c: lambda s: [x for part in s for x in part] for c in ("item_ids", "actions", "surfaces", "ts")}
    )
    path = Layout.partition(layout.user_sequences, "2026-01-03")
    path.mkdir(parents=True)
    seqs.reset_index().to_parquet(path / "part-0.parquet")
    items = pd.read_parquet(layout.items / "items.parquet", columns=["item_id", "category"]).set_index("item_id")
    day0 = pd.Timestamp(ds, tz="UTC")
    rows, targets = [], {}
    for u, hist in seqs["item_ids"].items():
        cat = items.loc[list(hist), "category"].mode().iloc[0]
        pool = items.index[items["category"] == cat].to_numpy()
        target = int(pool[(int(u) * 7) % len(pool)])
        targets[int(u)] = target
        for minute, action, item in ((540, "impression", pool[0]), (570, "hide", pool[1]), (600, "click", target),
                                     (660, "save", pool[2])):  # fmt: skip
            rows.append((int(u), int(item), action, day0 + pd.Timedelta(minutes=minute), f"{u}-{minute}"))
    rows.append((999_999, int(items.index[0]), "click", day0, "new-user"))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "ts", "event_id"])
    path = Layout.partition(layout.valid_events, ds)
    path.mkdir(parents=True)
    events.to_parquet(path / "part-0.parquet")
    return targets


def test_pretrain_retrieval_scores_the_held_out_day_and_loads_earlier_artifacts(world: Layout, tmp_path) -> None:
    layout = Layout(tmp_path / "w")  # the world's data without the models other tests wrote into it
    shutil.copytree(world.root, layout.root, ignore=shutil.ignore_patterns("models", "runs"))
    targets = _add_held_out_day(layout)
    day = HeldOutDay.load(layout, "2026-01-04")
    assert dict(zip(day.history["user_id"], day.targets, strict=True)) == targets  # the first positive of the day
    assert day.n_without_history == 1 and len(day.catalog) == 160

    new = pretrain(layout, PretrainConfig.preset("tiny").replace(device="cpu"))["version"]
    art = load_artifact(layout, "pinfm", new)
    assert art["config"]["objective"]["similarity"] == "dot" and art["config"]["pretrain"]["recipe"] == "pinfm"
    # an artifact as the pipeline wrote it before the recipe: no objective in its config (cosine scores then)
    before = {k: v for k, v in art["config"].items() if k != "objective"}
    before["pretrain"] = {k: v for k, v in before["pretrain"].items() if k != "recipe"}
    old = save_artifact(layout, "pinfm", art["state_dict"], config=before, metrics={}, data_version=art["data_version"])
    assert _resolve_backbone(layout, old, "small")[0] == PinFMConfig.from_dict(before["model"])  # fine-tuning loads it

    out = pretrain_retrieval(layout, [old, new], device="cpu")
    assert (out["ds"], out["history_ds"], out["n_users"], out["n_without_history"]) == (
        "2026-01-04",
        "2026-01-03",
        80,
        1,
    )
    assert [r["similarity"] for r in out["runs"]] == ["cosine", "dot"]
    dot = out["runs"][1]
    assert dot["hr@50"] >= dot["hr@10"] and 0 <= dot["target_in_history"] <= 1
    # the targets are in the user's category (40 of 160 items): far above chance (MRR ~0.035, HR@50 ~0.31)
    assert dot["mrr"] > 0.05 and dot["hr@50"] > 0.6, dot
    assert out["paired"]["n_users"] == 80 and out["paired"]["mrr"]["b"] == pytest.approx(dot["mrr"], abs=1e-5)
    same = pretrain_retrieval(layout, [new, new], device="cpu")["paired"]["ndcg@10"]
    assert same["diff"] == 0.0 and same["a_better"] == same["b_better"] == 0

    leaky = save_artifact(
        layout, "pinfm", art["state_dict"], config=art["config"], metrics={}, data_version={"corpus_ds": "2026-01-04"}
    )
    with pytest.raises(ValueError, match="includes the held-out day 2026-01-04"):
        pretrain_retrieval(layout, [leaky], device="cpu")
