"""Fine-tuning runs on the shared Trainer: per-part learning rates, pure-step batches, crash resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.contract import LABEL_ACTIONS
from training.data import ContentTable, ItemCreatedAt, RankingData, SequenceArrays
from training.jobs.finetune import FinetuneConfig, ItemFacts, RankingBatches, ranker_objective, train_ranker
from training.model.backbone import PinFMConfig
from training.model.ranker import NewItemConfig, Ranker, RankerConfig
from training.trainer import LossModule, Trainer, param_groups

BACKBONE = PinFMConfig.preset("tiny")
CFG = FinetuneConfig(epochs=2, batch_size=24, warmup=2, model="tiny", device="cpu", new_items=NewItemConfig.off())


def _ranking_data(n_requests: int = 30, per_request: int = 4, seed: int = 0) -> RankingData:
    """Random requests whose click label follows the candidate id's parity (something to learn)."""
    rng = np.random.default_rng(seed)
    L = 8
    lengths = rng.integers(1, L + 1, n_requests)
    pad = np.arange(L)[None, :] < lengths[:, None]
    seqs = SequenceArrays(
        item_ids=np.where(pad, rng.integers(1, 60, (n_requests, L)), 0),
        action_ids=np.where(pad, 2, 0),
        surface_ids=np.where(pad, 1, 0),
        lengths=lengths,
    )
    n = n_requests * per_request
    items = rng.integers(1, 60, n)
    labels = np.zeros((n, len(LABEL_ACTIONS)), np.float32)
    labels[:, 0] = items % 2
    return RankingData(
        sequences=seqs,
        request_ids=np.array([f"r{i}" for i in range(n_requests)]),
        req_index=np.repeat(np.arange(n_requests), per_request),
        item_ids=items,
        surface_ids=np.ones(n, np.int64),
        labels=labels,
        days=["2026-01-01"],
        request_ts=np.full(n_requests, 1_000_000),
    )


ITEMS = ItemFacts(ContentTable.empty(), ItemCreatedAt(np.zeros(0, np.int64), np.zeros(0, np.int64)))


def _trainer(data: RankingData, run_dir: Path) -> Trainer:
    torch.manual_seed(CFG.seed)
    model = Ranker(RankerConfig(backbone=BACKBONE, new_items=CFG.new_items))
    batches = RankingBatches(data, ITEMS, CFG.batch_size, CFG.epochs, CFG.seed)
    return Trainer(
        model,
        ranker_objective(CFG, data),
        batches,
        CFG.trainer_config(len(batches), "cpu").replace(ckpt_every=1, progress_bar=False),
        run_dir=run_dir,
        lr_scales={"model.backbone.": CFG.backbone_lr_scale},
    )


def test_the_backbone_learns_at_its_scaled_rate() -> None:
    model = Ranker(RankerConfig(backbone=BACKBONE))
    module = LossModule(model, ranker_objective(CFG, _ranking_data()))
    groups = param_groups(module, 0.01, lr=2e-3, lr_scales={"model.backbone.": 0.1})
    backbone = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        in_backbone = {id(p) in backbone for p in g["params"]}
        assert len(in_backbone) <= 1, "a group mixes backbone and head parameters"
        if in_backbone == {True}:
            assert g["lr"] == pytest.approx(2e-4)
        elif in_backbone == {False}:
            assert "lr" not in g  # the optimizer's base lr
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len([p for p in module.parameters() if p.requires_grad])


def test_batches_are_a_pure_function_of_the_step_and_cover_every_impression_per_epoch() -> None:
    data = _ranking_data()
    a, b = RankingBatches(data, ITEMS, 24, 2, seed=3), RankingBatches(data, ITEMS, 24, 2, seed=3)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    per_epoch = len(a) // 2
    assert sorted(np.concatenate(a.batches[:per_epoch]).tolist()) == list(range(len(data)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches[:per_epoch], a.batches[per_epoch:], strict=True))
    assert torch.equal(a(1)["cand_ids"], b(1)["cand_ids"])


def test_a_crashed_finetuning_resumes_and_takes_the_same_steps(tmp_path: Path) -> None:
    data = _ranking_data()
    straight = _trainer(data, tmp_path / "straight").fit()
    _trainer(data, tmp_path / "crashed").fit(stop_after=3)  # killed after step 3's checkpoint
    resumed = _trainer(data, tmp_path / "crashed").fit()
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)


def test_train_ranker_learns_and_reports_the_metrics() -> None:
    data, test = _ranking_data(seed=0), _ranking_data(seed=1)
    rcfg = RankerConfig(backbone=BACKBONE, new_items=CFG.new_items)
    model, metrics, losses = train_ranker(
        data, test, ITEMS, CFG.replace(epochs=6), rcfg, None, None, torch.device("cpu")
    )
    assert isinstance(model, Ranker) and len(losses) > 6
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert metrics["n_train"] == len(data) and metrics["auc_click"] is not None
