"""The trainer's own collectives under torchrun, on 2 CPU processes (gloo, spawned here).

* :func:`all_reduce_sparse_grads` leaves every rank the mean of the ranks' sparse gradients,
  what a dense all-reduce gives;
* :func:`gather_rows` puts the ranks' rows back in the batch's order, and its backward hands
  each rank the sum of every rank's gradient of its rows;
* :meth:`Trainer.step_gradients` on 2 ranks gives the single-process gradient of the whole
  batch (dense and sparse), also when the ranks hold unequal shares of rows or one holds none.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training.bench.seqrec import pad_right, seq_batch
from training.model.backbone import PinFM, PinFMConfig
from training.model.objectives import ItemCatalog, PinFMObjective
from training.model.recipes import PINFM
from training.trainer import (
    LossModule,
    RowShards,
    Trainer,
    TrainerConfig,
    all_reduce_sparse_grads,
    gather_rows,
    sparse_parameters,
)

WORLD = 2


def _sparse_grads_case(rank: int) -> None:
    tables = [nn.Embedding(10, 3, sparse=True) for _ in range(3)]
    for t in tables:  # the same weights on both ranks
        nn.init.constant_(t.weight, 0.5)
    lookups = {0: [1, 1, 4, 7], 1: [4, 9, 9, 0]}  # repeated rows, and rows both ranks touch
    scale = {0: 1.0, 1: -3.0}
    expected = torch.zeros(10, 3)
    for r in range(WORLD):
        for i in lookups[r]:
            expected[i] += scale[r] * (i + 1)
    expected /= WORLD
    ids = torch.tensor(lookups[rank])
    (tables[0](ids) * scale[rank] * (ids + 1)[:, None]).sum().backward()
    if rank == 0:  # table 1: a gradient on rank 0 only; table 2: on no rank
        tables[1](ids).sum().backward()
    all_reduce_sparse_grads([t.weight for t in tables], WORLD)
    assert tables[0].weight.grad.is_sparse and tables[0].weight.grad.is_coalesced()
    torch.testing.assert_close(tables[0].weight.grad.to_dense(), expected, rtol=0, atol=1e-6)
    one_rank = torch.zeros(10, 3)
    for i in lookups[0]:
        one_rank[i] += 1.0
    torch.testing.assert_close(tables[1].weight.grad.to_dense(), one_rank / WORLD)
    assert tables[2].weight.grad is None


def _gather_case(rank: int) -> None:
    for rows in (5, 1):  # unequal shares; a rank with no rows
        full = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
        local = full[rank::WORLD].clone().requires_grad_(True)
        out = gather_rows(local, rows, RowShards(rank, WORLD))
        torch.testing.assert_close(out, full)
        weights = torch.linspace(-1, 1, rows * 3).reshape(rows, 3)
        (out * weights).sum().backward()  # every rank's copy of the same loss
        torch.testing.assert_close(local.grad, WORLD * weights[rank::WORLD])


def _batches(rows: int):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 40, size=int(rng.integers(2, 9))) for _ in range(rows)]
    items, lengths = pad_right(seqs, 8)
    return seqs, seq_batch(items, lengths)


def _model_and_objective(seqs) -> tuple[PinFM, PinFMObjective]:
    torch.manual_seed(0)
    model = PinFM(PinFMConfig(d_model=16, n_layers=1, n_heads=2, max_len=8, hash_buckets=64, sparse_item_grads=True))
    # the pinfm recipe (in-batch + sampled negatives, log-Q, next + multi-token) at test scale
    return model, PinFMObjective(PINFM.objective_config(negatives=16), ItemCatalog.from_sequences(seqs))


def _step_gradients_case(rank: int) -> None:
    for rows in (7, 1):  # rank 0 holds 4 rows and rank 1 3; then rank 1 holds none
        seqs, batch = _batches(rows)
        model, objective = _model_and_objective(seqs)
        reference = LossModule(model, objective)
        torch.manual_seed(11)  # the objective's draws (negatives)
        loss, _ = reference(batch)
        loss.backward()
        expected = {n: p.grad.to_dense() for n, p in reference.named_parameters() if p.grad is not None}

        model, objective = _model_and_objective(seqs)
        cfg = TrainerConfig(steps=1, device="cpu", desc="ddp-test", progress_bar=False)
        trainer = Trainer(model, objective, lambda step, b=batch: b, cfg)
        assert trainer.world == WORLD and trainer.sparse_params == sparse_parameters(trainer.module)
        torch.manual_seed(11)
        ddp_loss, _, _ = trainer.step_gradients(0)
        torch.testing.assert_close(ddp_loss.detach(), loss.detach(), rtol=1e-6, atol=0)  # the whole batch's loss
        got = {n: p.grad.to_dense() for n, p in trainer.module.named_parameters() if p.grad is not None}
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=f"{rows} rows, {name}")


def _worker(rank: int, store: str, errors: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        _sparse_grads_case(rank)
        _gather_case(rank)
        _step_gradients_case(rank)
    except Exception:  # reported by the parent, which names the rank
        Path(f"{errors}.{rank}").write_text(traceback.format_exc(), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_to_the_single_process_gradient(tmp_path: Path) -> None:
    errors = tmp_path / "error"
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(errors)), nprocs=WORLD, start_method="spawn")
    failed = {p.name: p.read_text() for p in tmp_path.glob("error.*")}
    assert not failed, "\n".join(f"{name}:\n{text}" for name, text in failed.items())


def test_sparse_reduction_is_a_no_op_on_one_process() -> None:
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 1, 3])).sum().backward()
    before = emb.weight.grad
    all_reduce_sparse_grads([emb.weight], 1)
    assert emb.weight.grad is before
