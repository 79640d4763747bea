"""``afm bench pretrain``: the FLOP count and the JSON line (CPU, a couple of small steps)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from afm.cli import cli
from training.bench.pretrain import bench_pretrain, model_flops_per_step
from training.model.backbone import PinFM, PinFMConfig


def test_flop_count_of_a_known_size() -> None:
    model = PinFM(PinFMConfig(d_model=64, n_layers=2, n_heads=2, max_len=16, hash_buckets=128))
    per_block = (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 4 * 64  # qkv, proj, mlp, 2 LN
    n = 2 * per_block + 2 * 64  # + final LN; embedding lookups are no matmuls
    tokens = 4 * 16
    want = 6 * n * tokens + 6 * 2 * 16 * 64 * tokens + 6 * 10 * (10 + 32) * 64
    assert model_flops_per_step(model, 4, 16, pairs=10, negatives=32) == want
    capped = want - 6 * 10 * (10 - 4) * 64  # in-batch keys capped at 4
    assert model_flops_per_step(model, 4, 16, pairs=10, negatives=32, keys=4) == capped


def test_the_reference_objective_is_the_recipe_on_the_next_token_loss() -> None:
    from training.bench.pretrain import REFERENCE_OBJECTIVE
    from training.model.recipes import PINFM

    assert PINFM.departures(REFERENCE_OBJECTIVE) == {}
    assert (REFERENCE_OBJECTIVE.next_token, REFERENCE_OBJECTIVE.multi_token) == (1.0, 0.0)


def test_bench_line_on_cpu() -> None:
    line = bench_pretrain(device="cpu", steps=1, batch_size=2, seq_len=32)
    assert line["bench"] == "pretrain" and line["tokens_per_s"] > 0
    assert 0 < line["ratio"] < 5 and line["mfu"] is None  # no nominal peak on CPU
    res = CliRunner().invoke(cli, ["bench", "pretrain", "--device", "cpu", "--steps", "1", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["seq_len"] == 256
