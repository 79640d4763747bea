"""Distillation (training/experiments/distill.py, objectives.distillation_loss) and codistillation's weight exchange."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from afm.cli import cli
from training.bench.seqrec import SeqRecBatches, SeqRecConfig, SeqRecData
from training.experiments.distill import SNAPSHOT_DIR, EnsembleTeacher, PeerTeacher, TeacherModel, snapshot_path
from training.model.backbone import PinFM
from training.model.objectives import (
    MASKED_LOGIT,
    ItemCatalog,
    ObjectiveConfig,
    PinFMObjective,
    distillation_loss,
    next_token_pairs,
    sampled_softmax_logits,
)


def _model(seed: int, dropout: float = 0.0) -> PinFM:
    cfg = SeqRecConfig.from_dict({**SeqRecConfig.preset("tiny").to_dict(), "max_len": 10, "dropout": dropout})
    torch.manual_seed(seed)
    return PinFM(cfg.model_config())


def _batch(chain_file) -> tuple[dict, ItemCatalog]:
    data = SeqRecData.load(chain_file(n_users=40))
    train = data.train_sequences()
    return SeqRecBatches(train, 16, 10, seed=0)(0), ItemCatalog.from_sequences(train)


class _OneLogitSet:
    """A teacher whose logits are given: scores(rows, q_pos, pos, cand) returns them."""

    def __init__(self, pos: torch.Tensor, cand: torch.Tensor) -> None:
        self.pos, self.cand, self.ready = pos, cand, True

    def observe(self, batch: dict) -> None:
        pass

    def scores(self, rows, q_pos, pos_ids, cand_ids):  # noqa: ANN001, ANN201
        return self.pos, self.cand


def test_distillation_loss_is_the_kl_over_the_students_candidates_with_its_biases_and_masks() -> None:
    torch.manual_seed(0)
    q, keys = torch.randn(3, 8), torch.randn(3, 8)
    ids = torch.tensor([5, 6, 5])  # pair 2's positive is pair 0's: an accidental hit, removed for both
    neg_ids, neg = torch.tensor([7, 8]), torch.randn(2, 8)
    pos_logq, neg_logq = torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-3.0, -0.5])
    student = sampled_softmax_logits(q, ids, keys, neg_ids, neg, 0.5, pos_logq, neg_logq, similarity="dot")
    t_pos, t_cand = torch.randn(3), torch.randn(3, 5)
    got = distillation_loss(student, _OneLogitSet(t_pos, t_cand), None, None, ids, temperature=2.0)

    bias = -torch.cat([pos_logq, neg_logq])  # (C,): keys (the 3 positives) then the 2 negatives
    s_logits = torch.cat([(q / 0.5 * keys).sum(-1, keepdim=True) - pos_logq[:, None],
                          q / 0.5 @ torch.cat([keys, neg]).T + bias], dim=1)  # fmt: skip
    teacher = torch.cat([t_pos[:, None] - pos_logq[:, None], t_cand + bias], dim=1)
    hit = torch.cat([torch.zeros(3, 1, dtype=torch.bool), ids[:, None] == torch.cat([ids, neg_ids])[None, :]], dim=1)
    want = 0.0
    for i in range(3):
        keep = ~hit[i]
        p_t = F.softmax(teacher[i, keep] / 2.0, dim=0)
        log_p_s = F.log_softmax(s_logits[i, keep] / 2.0, dim=0)
        want += float((p_t * (p_t.log() - log_p_s)).sum()) * 4.0 / 3
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert student.cand[2, 0] == MASKED_LOGIT and student.cand[0, 2] == MASKED_LOGIT
    # the student's own logits as the teacher's: no divergence
    same = _OneLogitSet(student.pos + pos_logq, student.cand - bias)  # what scores() returns: before the biases
    assert float(distillation_loss(student, same, None, None, ids)) == pytest.approx(0.0, abs=1e-5)


def test_ensemble_teacher_scores_by_the_members_mean_logit(chain_file) -> None:
    batch, _ = _batch(chain_file)
    a, b = _model(0), _model(1)
    teacher = EnsembleTeacher([TeacherModel(a, 0.05), TeacherModel(b, 0.2, "cosine")])
    with pytest.raises(RuntimeError, match="before observe"):
        teacher.scores(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    teacher.observe(batch)
    rows, q_pos, t_pos = next_token_pairs(batch["positive"] & batch["pad_mask"])
    pos_ids, cand_ids = batch["item_ids"][rows, t_pos], torch.tensor([1, 2, 3, 4])
    pos, cand = teacher.scores(rows, q_pos, pos_ids, cand_ids)
    with torch.no_grad():
        want_pos, want_cand = 0, 0
        for m, temp, cosine in ((a, 0.05, False), (b, 0.2, True)):
            h = m.eval()(batch["item_ids"], batch["action_ids"], batch["surface_ids"], None, None)[rows, q_pos]
            e_pos, e_cand = m.item_embedding(pos_ids), m.item_embedding(cand_ids)
            if cosine:
                h, e_pos, e_cand = F.normalize(h, dim=-1), F.normalize(e_pos, dim=-1), F.normalize(e_cand, dim=-1)
            want_pos = want_pos + (h * e_pos).sum(-1) / temp / 2
            want_cand = want_cand + h @ e_cand.T / temp / 2
    assert torch.allclose(pos, want_pos, atol=1e-5) and torch.allclose(cand, want_cand, atol=1e-5)
    assert cand.shape == (rows.numel(), 4)


def test_objective_adds_the_distillation_loss_only_with_a_ready_teacher(chain_file) -> None:
    batch, catalog = _batch(chain_file)
    cfg = ObjectiveConfig(similarity="dot", negatives=16, multi_token=1.0, distill=0.5)
    student, teacher_model = _model(0, dropout=0.0), _model(1)
    objective = PinFMObjective(cfg, catalog)
    torch.manual_seed(0)
    alone, stats = objective(student, batch)
    assert "loss_distill" not in stats  # no teacher: the term is left out
    objective.teacher = EnsembleTeacher([TeacherModel(teacher_model, 0.05)])
    torch.manual_seed(0)
    total, stats = objective(student, batch)
    assert stats["loss_distill"] > 0
    assert float(total.detach()) == pytest.approx(float(alone.detach()) + 0.5 * stats["loss_distill"], rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in teacher_model.parameters())  # the teacher is not trained
    assert "teacher" not in "".join(objective.state_dict())  # nor saved with the objective
    # a teacher that equals the student (dropout off, the student's temperature) adds nothing
    objective.teacher = EnsembleTeacher([TeacherModel(student, float(objective.temperature.detach()))])
    torch.manual_seed(0)
    _, stats = objective(student.eval(), batch)
    assert stats["loss_distill"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="distill works on the sampled softmax"):
        ObjectiveConfig(negatives="full", distill=1.0)


def _peer(tmp_path: Path, me: str, other: str, seed: int, per_epoch: int = 4, **kw) -> PeerTeacher:  # noqa: ANN003
    model = _model(seed)
    return PeerTeacher(model, torch.tensor(np.log(0.05 * (seed + 1))), tmp_path / me, [tmp_path / other],
                       [_model(99)], "dot", per_epoch, start_epoch=1, **kw)  # fmt: skip


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_peers_swap_their_epoch_start_weights_and_keep_only_what_a_peer_may_still_read(tmp_path: Path) -> None:
    a, b = _peer(tmp_path, "a", "b", 0), _peer(tmp_path, "b", "a", 1)
    for step in range(4):  # epoch 0: no teacher, no snapshot
        a.at_step(step)
        b.at_step(step)
    assert not a.ready and not (tmp_path / "a" / SNAPSHOT_DIR).exists()

    def both(step: int) -> None:
        t = threading.Thread(target=b.at_step, args=(step,))
        t.start()
        a.at_step(step)  # waits for b's snapshot of the same step
        t.join()

    both(4)
    assert a.ready and a.loaded_step == 4
    assert _same_weights(a.members[0].model, b.model) and _same_weights(b.members[0].model, a.model)
    assert a.members[0].temperature == pytest.approx(0.1) and b.members[0].temperature == pytest.approx(0.05)
    with torch.no_grad():
        b.model.items.tables[0].weight.add_(1.0)  # b trains on
    a.at_step(5)  # inside an epoch: the teacher stays the epoch-start one
    assert not _same_weights(a.members[0].model, b.model)
    both(8)
    assert _same_weights(a.members[0].model, b.model)
    assert not snapshot_path(tmp_path / "a", 4).exists() and snapshot_path(tmp_path / "a", 8).exists()
    # b stops (early, or it has finished): a keeps learning from b's last weights
    b.finish(9)
    a.at_step(12)
    assert a.loaded_step == 12 and _same_weights(a.members[0].model, b.model)


def test_a_peer_that_never_writes_is_named_after_the_timeout(tmp_path: Path) -> None:
    a = _peer(tmp_path, "a", "b", 0, timeout_s=0.2, poll_s=0.05)
    with pytest.raises(TimeoutError, match=r"peer .*b wrote no snapshot for step 4"):
        a.at_step(4)


def test_bench_codistill_reports_the_best_validating_member_and_resumes(tmp_path: Path, chain_file) -> None:
    data = chain_file()
    run = tmp_path / "codistill"
    args = ["bench", "seqrec", "--data", str(data), "--preset", "tiny", "--max-len", "10", "--device", "cpu",
            "--epochs", "3", "--members", "2", "--codistill", "--run-dir", str(run)]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert line["bench"] == "seqrec-codistill" and line["config"]["objective"]["distill"] == 1.0
    best = max(line["members"], key=lambda m: m["best_valid_ndcg@10"])
    assert line["model"] == Path(best["run_dir"]).name and line["ndcg@10"] == best["ndcg@10"]
    assert line["hr@10"] > 0.3 and line["ensemble"]["n_users"] == 240, line
    for member in ("member-0", "member-1"):
        logged = [json.loads(ln) for ln in (run / member / "metrics.jsonl").read_text().splitlines()]
        assert [r for r in logged if "loss" in r][-1]["loss_distill"] > 0, (
            member
        )  # the last step learned from the peer too
        assert not (run / member / SNAPSHOT_DIR).exists()  # the exchanged weights are removed at the end
    again = CliRunner().invoke(cli, args)  # every member resumes from its final checkpoint
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["ndcg@10"] == line["ndcg@10"]
    usage = CliRunner().invoke(cli, ["bench", "seqrec", "--data", str(data), "--codistill"])
    assert usage.exit_code != 0 and "--codistill needs --members" in usage.output


def test_bench_teacher_distils_one_model_from_finished_runs(tmp_path: Path, chain_file) -> None:
    data = chain_file()
    base = ["bench", "seqrec", "--data", str(data), "--preset", "tiny", "--max-len", "10", "--device", "cpu",
            "--epochs", "2"]  # fmt: skip
    assert CliRunner().invoke(cli, [*base, "--run-dir", str(tmp_path / "t")]).exit_code == 0
    res = CliRunner().invoke(
        cli, [*base, "--seed", "1", "--teacher", str(tmp_path / "t"), "--home", str(tmp_path / "h")]
    )
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert line["teachers"] == [str(tmp_path / "t")] and line["config"]["objective"]["distill"] == 1.0
    assert Path(line["run_dir"]).name.startswith("seqrec-distill")
    logged = [json.loads(ln) for ln in (Path(line["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_distill"] > 0 for r in logged if "loss" in r)
    both = CliRunner().invoke(cli, [*base, "--teacher", str(tmp_path / "t"), "--members", "2"])
    assert both.exit_code != 0 and "--teacher trains one model" in both.output
