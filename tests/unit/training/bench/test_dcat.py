"""``bench_dcat`` (training/bench/dcat.py): the JSON line at a tiny size on CPU."""

from __future__ import annotations

import json

from training.bench.dcat import bench_dcat


def test_bench_line_at_a_tiny_size() -> None:
    line = bench_dcat(
        seq_len=16, candidates=8, requests=2, d_model=32, n_layers=1, n_heads=4, device="cpu", reps=1, naive_max=5
    )
    for key in ("bench", "seq_len", "candidates", "requests", "d_model", "n_layers", "n_heads", "device", "dtype"):
        assert key in line, key
    assert line["bench"] == "dcat" and line["seq_len"] == 16 and line["candidates"] == 8 and line["requests"] == 2
    assert line["device"].startswith("cpu") and line["dtype"] == "fp32" and line["crossing_attention"] == "fused"
    seq = line["seq_module"]
    assert seq["dcat_cands_per_s"] > 0 and seq["naive_cands_per_s"] > 0 and seq["ratio"] > 0
    assert seq["naive_candidates"] == 2 * 5
    assert seq["max_abs_diff"] < 1e-4
    ranker = line["ranker"]  # the whole early-fusion ranker, DCAT vs naive, same weights
    assert ranker["ratio"] > 0 and ranker["dcat_cands_per_s"] > 0 and ranker["max_abs_diff"] < 1e-4
    assert line["ratio"] == ranker["ratio"]
    json.dumps(line)  # one JSON line


def test_compiled_sequence_module_matches_eager() -> None:
    line = bench_dcat(
        seq_len=8, candidates=4, requests=1, d_model=32, n_layers=1, n_heads=4, device="cpu", reps=1, naive_max=2,
        compile=True,
    )  # fmt: skip
    comp = line["seq_module_compiled"]
    assert comp["candidates_per_s"] > 0 and comp["eager_candidates_per_s"] > 0 and comp["speedup_vs_eager"] > 0
    assert comp["max_abs_diff_vs_eager"] < 1e-4  # inductor's kernels give the eager numbers
    assert "seq_module_compiled" not in bench_dcat(
        seq_len=8, candidates=4, requests=1, d_model=32, n_layers=1, n_heads=4, device="cpu", reps=1, naive_max=2
    )
