"""Trainer: a resumed run equals an uninterrupted one; DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.bench.seqrec import SeqRecBatches, SeqRecData
from training.model.backbone import PinFM, PinFMConfig
from training.model.objectives import ItemCatalog, ObjectiveConfig, PinFMObjective
from training.trainer import Trainer, TrainerConfig, clip_grad_norm, warmup_cosine

REPO = Path(__file__).resolve().parents[3]


def _trainer(run_dir: Path, data: SeqRecData, steps: int = 12, sparse: bool = False) -> Trainer:
    torch.manual_seed(123)
    train = data.train_sequences()
    model = PinFM(
        PinFMConfig(
            d_model=32, n_layers=1, n_heads=2, max_len=11, hash_buckets=1024, dropout=0.2, sparse_item_grads=sparse
        )
    )
    objective = PinFMObjective(ObjectiveConfig(negatives=32, multi_token=0.5), ItemCatalog.from_sequences(train))
    cfg = TrainerConfig(steps=steps, lr=3e-3, warmup=3, device="cpu", seed=7, log_every=1, ckpt_every=4)
    return Trainer(model, objective, SeqRecBatches(train, 16, 10, seed=1), cfg, run_dir=run_dir)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-item-grads"])
def test_resumed_run_continues_exactly(tmp_path: Path, chain_file, sparse: bool) -> None:
    data = SeqRecData.load(chain_file(n_users=60))
    full = _trainer(tmp_path / "full", data, sparse=sparse).fit()

    crashed = _trainer(tmp_path / "crash", data, sparse=sparse)
    assert (crashed.sparse_opt is not None) == sparse  # hash tables go to SparseAdam
    partial = crashed.fit(stop_after=6)  # checkpoint at 4, steps 5-6 are lost with the "crash"
    assert partial.steps == 6
    resumed_trainer = _trainer(tmp_path / "crash", data, sparse=sparse)
    resumed = resumed_trainer.fit()

    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses  # bit-identical: same data, RNG, optimizer state
    full_state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["module"]
    for k, v in resumed_trainer.module.state_dict().items():
        assert torch.equal(v, full_state[k]), k
    # the metrics log has each step once, also after the resume
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert (tmp_path / "crash" / "training_curve.png").stat().st_size > 0


def test_fresh_run_starts_an_empty_metrics_log(tmp_path: Path, chain_file) -> None:
    data = SeqRecData.load(chain_file(n_users=30))
    _trainer(tmp_path / "run", data, steps=4).fit()
    t = _trainer(tmp_path / "run", data, steps=4)
    t.resume = False  # what `afm bench seqrec --fresh` does
    t.fit()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path, chain_file) -> None:
    data = SeqRecData.load(chain_file(n_users=30))
    _trainer(tmp_path / "run", data, steps=4).fit()
    with pytest.raises(ValueError, match="was written by a run of 4 steps, this run has 8"):
        _trainer(tmp_path / "run", data, steps=8).fit()


def test_sparse_item_grads_touch_only_looked_up_rows(tmp_path: Path, chain_file) -> None:
    """Lazy Adam: a hash row no step looked up keeps its initial value; looked-up rows move."""
    data = SeqRecData.load(chain_file(n_users=40))
    trainer = _trainer(tmp_path / "run", data, steps=3, sparse=True)
    before = [t.weight.detach().clone() for t in trainer.model.items.tables]
    trainer.fit()
    items = torch.arange(1, data.n_items + 1)
    for t, (table, w0) in enumerate(zip(trainer.model.items.tables, before, strict=True)):
        used = torch.zeros(table.num_embeddings, dtype=torch.bool)
        used[trainer.model.items.buckets(items)[:, t]] = True
        changed = (table.weight.detach() != w0).any(1)
        assert changed[used].any() and not changed[~used].any()


def test_adam_beta2_and_sparse_lr_scale_reach_the_optimizers(tmp_path: Path, chain_file) -> None:
    data = SeqRecData.load(chain_file(n_users=40))
    trainer = _trainer(tmp_path / "run", data, steps=3, sparse=True)
    assert trainer.opt.param_groups[0]["betas"] == (0.9, 0.999)  # the default
    cfg = trainer.cfg.replace(adam_beta2=0.98, sparse_lr_scale=2.0)
    other = Trainer(trainer.model, trainer.objective, trainer.batch_fn, cfg, run_dir=tmp_path / "other")
    assert other.sparse_opt is not None
    for opt in other.opts:
        assert all(g["betas"] == (0.9, 0.98) for g in opt.param_groups)
    dense_lr = other.opt.param_groups[0]["initial_lr"]
    assert other.sparse_opt.param_groups[0]["initial_lr"] == pytest.approx(2.0 * dense_lr)
    assert dense_lr == pytest.approx(cfg.lr)


def test_clip_grad_norm_matches_torch_on_dense_and_counts_sparse() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    (a(torch.randn(5, 4)).sum() * 10 + emb(torch.tensor([1, 1, 2])).sum() * 10).backward()
    dense_norm = torch.cat([a.weight.grad.flatten(), a.bias.grad]).norm()
    sparse_norm = emb.weight.grad.coalesce().values().norm()
    total = clip_grad_norm([a.weight, a.bias, emb.weight], 1.0)
    assert total == pytest.approx(float(torch.hypot(dense_norm, sparse_norm)), rel=1e-5)
    after = torch.cat([a.weight.grad.flatten(), a.bias.grad, emb.weight.grad.coalesce().values().flatten()]).norm()
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path: Path, chain_file) -> None:
    """torchrun --nproc_per_node 2 on gloo: both ranks train on their half, weights stay equal."""
    data = chain_file(n_users=80)
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "afm.cli", "bench", "seqrec", "--data", str(data), "--preset", "tiny", "--epochs", "2",
        "--device", "cpu", "--max-len", "10", "--run-dir", str(tmp_path / "run"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["ranks_in_sync"] is True
    assert (tmp_path / "run" / "checkpoint.pt").exists()
