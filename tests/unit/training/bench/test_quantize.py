"""afm bench quantize (tiny world, tiny ranker) and afm eval retrieval --quantize (tiny seqrec run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from afm.cli import cli
from features.config import Layout
from training.bench.quantize import bench_quantize
from training.jobs.finetune import FinetuneConfig, finetune


def test_the_benchmark_reports_every_format_smaller_and_as_good(world: Layout) -> None:
    version = finetune(world, FinetuneConfig(model="tiny", epochs=1, batch_size=128, device="cpu"), backbone="none")[
        "version"
    ]
    out = bench_quantize(world, version, candidates=50, reps=2, warmup=1)
    f = out["formats"]
    assert set(f) == {"fp32", "int8", "int4"} and out["candidates"] == 50 and out["version"] == version
    assert f["fp32"]["table_bytes"] > f["int8"]["table_bytes"] > f["int4"]["table_bytes"]
    assert f["fp32"]["model_pt_bytes"] > f["int8"]["model_pt_bytes"] > f["int4"]["model_pt_bytes"]
    assert all(x["cand_per_s"] > 0 for x in f.values())
    assert f["fp32"]["max_abs_prob_diff"] == 0 < f["int8"]["max_abs_prob_diff"] < f["int4"]["max_abs_prob_diff"]
    d = 32  # the tiny preset's d_model
    assert out["user_embedding_bytes"] == {"fp32": 4 * d, "int8": 3 + 4 + d, "int4": 3 + 8 + d // 2}
    rows = {(r["item_tables"], r["user_embeddings"]): r for r in out["quality"]}
    assert len(rows) == 9  # the default hybrid ranker reads the user embedding: 3 table × 3 embedding formats
    base = rows[("fp32", "fp32")]["auc_click"]
    assert abs(rows[("int8", "int8")]["auc_click"] - base) < 0.001
    assert abs(rows[("int4", "int4")]["auc_click"] - base) < 0.01


def test_eval_retrieval_scores_with_quantized_item_tables(tmp_path: Path, chain_file) -> None:
    data = chain_file()
    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        ["bench", "seqrec", "--data", str(data), "--preset", "tiny", "--max-len", "10", "--device", "cpu",
         "--run-dir", str(run)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = {}
    for fmt in ("fp32", "int8", "int4"):
        args = ["eval", "retrieval", "--run-dir", str(run), "--data", str(data), "--device", "cpu", "--quantize", fmt]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        got[fmt] = json.loads(res.output.strip().splitlines()[-1])
        assert got[fmt]["item_tables"] == fmt
    assert got["fp32"]["table_bytes"] > 3 * got["int8"]["table_bytes"] > 3 * got["int4"]["table_bytes"]
    assert got["fp32"]["hr@10"] > 0.5  # the chains are learned
    assert got["int8"]["hr@10"] == pytest.approx(got["fp32"]["hr@10"], abs=0.02)
    assert got["int4"]["hr@10"] == pytest.approx(got["fp32"]["hr@10"], abs=0.1)
    bad = CliRunner().invoke(cli, ["eval", "retrieval", "--run-dir", str(run), "--data", str(data), "--quantize", "q2"])
    assert bad.exit_code == 2 and "Invalid value for '--quantize'" in bad.output
