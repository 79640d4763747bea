"""Ensembles of seqrec runs (training/experiments/ensemble.py): summed logits, the --members bench, eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from afm.cli import cli
from training.bench.seqrec import SeqRecConfig, SeqRecData, SeqRecMember, retrieval_ranks, user_states
from training.experiments.ensemble import ensemble_ranks, member_dirs
from training.model.backbone import PinFM
from training.retrieval import ranks_full


def _member(seed: int, temperature: float, similarity: str = "dot") -> SeqRecMember:
    cfg = SeqRecConfig.preset("tiny")
    cfg = SeqRecConfig.from_dict(
        {**cfg.to_dict(), "max_len": 10, "objective": {**cfg.objective.to_dict(), "similarity": similarity}}
    )
    torch.manual_seed(seed)
    return SeqRecMember(PinFM(cfg.backbone_config()).eval(), cfg, temperature, Path("."))  # fmt: skip


def test_ensemble_ranks_by_the_members_summed_logits(chain_file) -> None:
    data = SeqRecData.load(chain_file(n_users=60))
    a, b = _member(0, 0.05), _member(1, 0.2, similarity="cosine")
    hist, targets, excluded = data.split("test")
    ids = torch.arange(data.n_items + 1)
    with torch.no_grad():
        logits = torch.zeros(len(hist), data.n_items + 1)
        for m in (a, b):
            q = user_states(m.model, hist, m.cfg.max_len)  # (U, D)
            e = m.model.item_embedding(ids)  # (I + 1, D)
            if m.cfg.objective.similarity == "cosine":
                q, e = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(e, dim=-1)
            logits += q @ e.T / m.temperature  # (U, I + 1)
    exclude = torch.zeros_like(logits, dtype=torch.bool)
    exclude[:, 0] = True
    for u, seen in enumerate(excluded):
        exclude[u, torch.as_tensor(seen)] = True
    want = ranks_full(logits, torch.as_tensor(targets), exclude)
    assert torch.equal(ensemble_ranks([a, b], data, "test"), want)
    # one member ranks as the plain model does; the same member twice ranks the same again
    single = retrieval_ranks(a.model, data, "test", 10, "dot")
    assert torch.equal(ensemble_ranks([a], data, "test"), single)
    assert torch.equal(ensemble_ranks([a, a], data, "test"), single)
    assert not torch.equal(want, single)  # b changed the ranking
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_ranks([], data, "test")


def test_bench_members_trains_side_by_side_and_eval_reproduces_the_ensemble(tmp_path: Path, chain_file) -> None:
    data = chain_file()
    run = tmp_path / "ens"
    args = ["bench", "seqrec", "--data", str(data), "--preset", "tiny", "--max-len", "10", "--device", "cpu",
            "--epochs", "2", "--seed", "3", "--members", "2", "--run-dir", str(run)]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert line["n_members"] == 2 and [m["seed"] for m in line["members"]] == [3, 4]
    assert line["n_users"] == 240 and line["hr@10"] > 0.3, line  # 85 % of next items are "last + 1"
    assert member_dirs(run) == [run / "member-0", run / "member-1"]
    assert member_dirs(run / "member-0") == [run / "member-0"]  # a plain run is its own member
    assert json.loads((run / "result.json").read_text())["ndcg@10"] == line["ndcg@10"]
    again = CliRunner().invoke(cli, args)  # started again: each member resumes from its final checkpoint
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.output.strip().splitlines()[-1])
    assert (rerun["ndcg@10"], rerun["members"][1]["ndcg@10"]) == (line["ndcg@10"], line["members"][1]["ndcg@10"])

    def ev(*dirs: Path) -> dict:
        r = CliRunner().invoke(
            cli, ["eval", "retrieval", *[a for d in dirs for a in ("--run-dir", str(d))], "--data", str(data), "--device", "cpu"]
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        return json.loads(r.output.strip().splitlines()[-1])

    whole = ev(run)
    assert whole["n_members"] == 2 and whole["ndcg@10"] == line["ndcg@10"] and whole["hr@10"] == line["hr@10"]
    assert ev(run / "member-0", run / "member-1")["ndcg@10"] == line["ndcg@10"]  # the members named one by one
    assert ev(run / "member-1")["ndcg@10"] == line["members"][1]["ndcg@10"]  # a member alone: its own figure

    compare = ["eval", "compare", "--run-dir", str(run / "member-0"), "--run-dir", str(run), "--data", str(data), "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(cli, compare)
    assert res.exit_code == 0, res.output
    paired = json.loads(res.output.strip().splitlines()[-1])
    assert paired["ndcg@10"]["a"] == pytest.approx(line["members"][0]["ndcg@10"], abs=1e-5)
    assert paired["ndcg@10"]["b"] == pytest.approx(line["ndcg@10"], abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to make the members fail")
def test_a_failing_member_is_named_and_stops_the_ensemble(tmp_path: Path, chain_file) -> None:
    args = ["bench", "seqrec", "--data", str(chain_file()), "--preset", "tiny", "--max-len", "10", "--device", "cuda",
            "--members", "2", "--run-dir", str(tmp_path / "ens")]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, RuntimeError)
    assert re.search(r"ensemble member member-[01] \(.*\) failed: .*cuda", str(res.exception), re.IGNORECASE)
    assert not (tmp_path / "ens" / "result.json").exists()
