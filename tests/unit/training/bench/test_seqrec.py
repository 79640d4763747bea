"""Sequential-recommendation benchmark pieces: file loading, leave-one-out split, batches, bench + eval CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from afm.cli import cli
from features.contract import ContractError
from training.bench.seqrec import SeqRecBatches, SeqRecConfig, SeqRecData, _sample_unseen, pad_right

REPO = Path(__file__).resolve().parents[4]
BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "beauty.txt"


def test_load_groups_users_and_keeps_their_order(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_text("2 5\n1 3\n2 4\n1 9\n2 7\n1 1\n")
    data = SeqRecData.load(f)
    assert data.user_ids.tolist() == [1, 2]
    assert [s.tolist() for s in data.sequences] == [[3, 9, 1], [5, 4, 7]]
    assert data.n_items == 9 and data.n_interactions == 6


@pytest.mark.parametrize(
    ("text", "match"),
    [("1 a\n", "integers"), ("1 0\n", "line 1: user and item ids must be ≥ 1"), ("", "no interactions")],
)
def test_load_rejects_bad_files(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(ContractError, match=match):
        SeqRecData.load(f)


def test_leave_one_out_split() -> None:
    data = SeqRecData(np.array([1, 2, 3]), [np.array([4, 5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3])], 9)
    assert [s.tolist() for s in data.train_sequences()] == [[4, 5], [8, 9], [1]]
    assert data.eval_users().tolist() == [0, 2]  # user 2 has < 3 items: training only
    hist, targets, excluded = data.split("valid")
    assert [h.tolist() for h in hist] == [[4, 5], [1]] and targets.tolist() == [6, 2]
    hist, targets, excluded = data.split("test")
    assert [h.tolist() for h in hist] == [[4, 5, 6], [1, 2]] and targets.tolist() == [7, 3]
    assert excluded[0].tolist() == [4, 5, 6, 7]


def test_batches_are_a_pure_function_of_the_step(chain_file) -> None:
    train = SeqRecData.load(chain_file(n_users=100)).train_sequences()
    a, b = SeqRecBatches(train, 16, 8, seed=3), SeqRecBatches(train, 16, 8, seed=3)
    for step in (0, 5, 7, 13):  # 7 batches per epoch: 13 is in epoch 1
        assert np.array_equal(a(step)["item_ids"].numpy(), b(step)["item_ids"].numpy())
    seen = np.concatenate([a(s)["lengths"].numpy() for s in range(a.per_epoch)])
    assert len(seen) == 100 and seen.max() <= 9  # every user once per epoch, ≤ max_len + 1 items
    items, lengths = pad_right([np.array([1, 2, 3]), np.array([4])], 2)
    assert items.tolist() == [[2, 3], [4, 0]] and lengths.tolist() == [2, 1]


def test_bench_learns_the_chains_and_eval_reproduces_it(tmp_path: Path, chain_file) -> None:
    data = chain_file()
    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        ["bench", "seqrec", "--data", str(data), "--preset", "tiny", "--max-len", "10", "--device", "cpu",
         "--run-dir", str(run), "--out", str(tmp_path / "out.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr", "n_users", "n_items", "train_seconds", "device"):
        assert key in line
    assert line["n_users"] == 240 and line["n_items"] == 120
    # 85 % of next items are "last + 1": popularity would give HR@10 ≈ 10/120
    assert line["hr@10"] > 0.5, line
    assert json.loads((tmp_path / "out.json").read_text())["ndcg@10"] == line["ndcg@10"]

    res = CliRunner().invoke(cli, ["eval", "retrieval", "--run-dir", str(run), "--data", str(data), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.output.strip().splitlines()[-1])
    assert again["ndcg@10"] == line["ndcg@10"] and again["hr@10"] == line["hr@10"]
    res = CliRunner().invoke(
        cli,
        [
            "eval",
            "retrieval",
            "--run-dir",
            str(run),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--protocol",
            "sampled100",
        ],
    )
    sampled = json.loads(res.output.strip().splitlines()[-1])
    assert sampled["hr@10"] >= again["hr@10"]  # 100 negatives are easier than 119

    same = ["eval", "compare", "--run-dir", str(run), "--run-dir", str(run), "--data", str(data), "--device", "cpu"]
    res = CliRunner().invoke(cli, same)
    assert res.exit_code == 0, res.output
    paired = json.loads(res.output.strip().splitlines()[-1])
    assert paired["n_users"] == 240
    assert paired["ndcg@10"]["a"] == paired["ndcg@10"]["b"] == pytest.approx(line["ndcg@10"], abs=1e-5)
    assert paired["ndcg@10"]["diff"] == 0.0 and paired["ndcg@10"]["b_better"] == paired["ndcg@10"]["a_better"] == 0
    res = CliRunner().invoke(cli, same[:4] + same[6:])  # one run only
    assert res.exit_code != 0 and "exactly twice" in res.output


def test_eval_names_a_run_dir_that_is_not_a_bench_run(tmp_path: Path, chain_file) -> None:
    res = CliRunner().invoke(cli, ["eval", "retrieval", "--run-dir", str(tmp_path), "--data", str(chain_file())])
    assert res.exit_code != 0
    assert "seqrec_config.json is missing" in str(res.exception)


@pytest.mark.parametrize(
    ("override", "message"),
    [("nosuch=1", "'nosuch' is not a setting"), ("objective.negatives=lots", "negatives"), ("lr=-1", "lr")],
)
def test_bench_set_refuses_a_bad_setting_before_training(
    tmp_path: Path, chain_file, override: str, message: str
) -> None:
    args = ["bench", "seqrec", "--data", str(chain_file()), "--preset", "tiny", "--device", "cpu"]
    res = CliRunner().invoke(cli, [*args, "--run-dir", str(tmp_path / "run"), "--set", override])
    assert res.exit_code == 2, res.output
    assert "--set" in res.output and message in res.output
    assert not (tmp_path / "run").exists()


def test_config_round_trip() -> None:
    cfg = SeqRecConfig.preset("tiny")
    assert SeqRecConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown seqrec preset"):
        SeqRecConfig.preset("huge")


@pytest.mark.realdata
@pytest.mark.skipif(not BEAUTY.exists(), reason="../shared/data/amazon-beauty is not present")
def test_beauty_file_loads_with_the_published_counts() -> None:
    data = SeqRecData.load(BEAUTY)
    assert (data.n_users, data.n_items, data.n_interactions) == (40226, 54542, 353962)
    assert len(data.eval_users()) == 40226  # 5-core: everyone has a validation and a test item


def test_sampled_protocol_negatives_are_distinct_and_unseen() -> None:
    rng = np.random.default_rng(0)
    seen = {1, 2, 3, 50}
    negs = _sample_unseen(rng, 110, seen, 100)  # 106 eligible items: 100 draws must not repeat
    assert len(negs) == 100 and len(set(negs.tolist())) == 100
    assert not set(negs.tolist()) & seen and negs.min() >= 1 and negs.max() <= 110
    with pytest.raises(ValueError, match="needs 100 items"):
        _sample_unseen(rng, 103, seen, 100)


def test_runs_saved_before_item_input_scaling_load_unscaled() -> None:
    saved = SeqRecConfig.preset("tiny").to_dict()
    assert SeqRecConfig.from_dict(saved).scale_item_input  # the current default
    del saved["scale_item_input"]
    assert not SeqRecConfig.from_dict(saved).scale_item_input


def test_runs_saved_with_a_retired_setting_load_only_where_it_did_nothing() -> None:
    saved = {**SeqRecConfig.preset("tiny").to_dict(), "full_softmax_epochs": 0, "distill_start_epoch": 1}
    assert SeqRecConfig.from_dict(saved) == SeqRecConfig.preset("tiny")
    with pytest.raises(ValueError, match="full_softmax_epochs=6"):
        SeqRecConfig.from_dict({**saved, "full_softmax_epochs": 6})
    with pytest.raises(ValueError, match="distill_start_epoch=3"):
        SeqRecConfig.from_dict({**saved, "distill_start_epoch": 3})
    with pytest.raises(ValueError, match="unknown SeqRecConfig fields"):
        SeqRecConfig.from_dict({**saved, "no_such_setting": 1})
    codistilled = {**saved, "objective": {**saved["objective"], "distill": 1.0, "distill_temperature": 1.0}}
    with pytest.raises(ValueError, match="distill=1.0"):  # a --codistill run of the removed code
        SeqRecConfig.from_dict(codistilled)


#: SeqRecConfig() as commit 66e15b0 saved it (seqrec_config.json), before the recipe module and the removal of
#: distillation; the benchmark's default figures depend on every one of these values
SAVED_DEFAULTS_66E15B0 = {
    "adam_beta2": 0.999, "batch_size": 256, "block_layout": "pre_ln", "d_model": 64, "device": "auto",
    "distill_start_epoch": 1, "dropout": 0.5, "epochs": 30, "eval_every_epochs": 3, "eval_users": 0,
    "hash_buckets": 2097152, "item_dropout": 0.0, "lr": 0.0015, "max_len": 50, "mlp_ratio": 4, "n_hash_tables": 2,
    "n_heads": 2, "n_layers": 2, "patience": 3, "scale_item_input": True, "seed": 0, "sparse_item_grads": True,
    "sparse_lr_scale": 1.0, "warmup": 200, "weight_decay": 0.0,
    "objective": {
        "catalog_matmul": "fp32", "distill": 0.0, "distill_temperature": 1.0, "future_token": 0.0, "future_window": 4,
        "in_batch_max": 1024, "in_batch_negatives": True, "init_temperature": 0.05, "logq_correction": True,
        "mask_own_sequence": False, "max_pairs": None, "multi_token": 1.0, "multi_token_window": 3,
        "negatives": 1024, "next_token": 1.0, "sampler": "popularity", "similarity": "dot",
    },
}  # fmt: skip


def test_the_default_config_is_the_recipe_and_equals_the_one_before_it_field_for_field() -> None:
    cfg = SeqRecConfig()
    retired = {"distill_start_epoch"}, {"distill", "distill_temperature"}
    want = {k: v for k, v in SAVED_DEFAULTS_66E15B0.items() if k not in retired[0]}
    want["objective"] = {k: v for k, v in want["objective"].items() if k not in retired[1]}
    assert cfg.to_dict() == want
    assert SeqRecConfig.from_dict(SAVED_DEFAULTS_66E15B0) == cfg == SeqRecConfig.preset("default")
    # the recipe's values, one by one
    o = cfg.objective
    assert (o.similarity, o.sampler, o.logq_correction, o.multi_token_window) == ("dot", "popularity", True, 3)
    assert (cfg.n_hash_tables, cfg.hash_buckets, cfg.lr) == (2, 2**21, 1.5e-3)
    assert (o.in_batch_max, o.negatives) == (1024, 1024)
    # the test preset is the recipe at test scale
    tiny = SeqRecConfig.preset("tiny").objective
    assert tiny == o.replace(negatives=64)
