"""``bench_dcat`` (training/bench/dcat.py): the JSON line at a tiny size on CPU.

The benchmark is judged by ``ratio`` (DCAT ÷ naive candidates/s of the whole ranker) with DCAT
and the naive path agreeing numerically. On a shared CPU the timings are noise, so these tests
assert no speed: they check that the line is complete, that its figures follow from one another
(rates from the candidate counts and the times, ratio from the rates) and that the two paths agree.
"""

from __future__ import annotations

import json

import pytest

from training.bench.dcat import bench_dcat

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 4, "device": "cpu", "reps": 1}
#: Every field the line documents, top level and per figure.
LINE_FIELDS = {
    "bench", "seq_len", "candidates", "requests", "d_model", "n_layers", "n_heads", "device", "dtype",
    "crossing_attention", "reps", "seq_module", "ranker", "ratio", "ranker_sequence", "seq_module_cands_per_s",
    "ranker_cands_per_s", "ranker_vs_seq_module",
}  # fmt: skip
FIGURE_FIELDS = {"dcat_cands_per_s", "naive_cands_per_s", "ratio", "dcat_ms", "naive_ms", "max_abs_diff"}


def _quotient_bounds(num: float, num_step: float, den: float, den_step: float) -> tuple[float, float]:
    """The range of ``a / b`` when ``num`` and ``den`` are ``a`` and ``b`` off by at most ``num_step`` and ``den_step``."""
    assert den > den_step, (den, den_step)
    return (num - num_step) / (den + den_step), (num + num_step) / (den - den_step)


def assert_consistent(fig: dict, n_dcat: int, n_naive: int) -> None:
    """The figure's rates follow from its counts and times, and its ratio from its rates (up to their rounding)."""
    assert FIGURE_FIELDS <= set(fig), FIGURE_FIELDS - set(fig)
    # candidates/s = n ÷ seconds; ms are rounded to 3 decimals, DCAT's rate to 1, the naive one to 2
    for key, n, ms, half in (
        ("dcat_cands_per_s", n_dcat, fig["dcat_ms"], 0.05),
        ("naive_cands_per_s", n_naive, fig["naive_ms"], 0.005),
    ):
        lo, hi = _quotient_bounds(n * 1e3, 0.0, ms, 0.0005)
        assert lo - half - 1e-9 <= fig[key] <= hi + half + 1e-9, (key, fig[key], n, ms)
    # ratio = DCAT candidates/s ÷ naive candidates/s, rounded to 2 decimals
    lo, hi = _quotient_bounds(fig["dcat_cands_per_s"], 0.05, fig["naive_cands_per_s"], 0.005)
    assert lo - 0.005 - 1e-9 <= fig["ratio"] <= hi + 0.005 + 1e-9, (fig["ratio"], lo, hi)
    assert 0 <= fig["max_abs_diff"] < 1e-4  # DCAT and the naive path give the same numbers (NaN fails here)


@pytest.mark.parametrize(
    ("candidates", "requests", "naive_max", "n_naive"),
    [(8, 2, 5, 5), (6, 1, 10, 6)],  # naive_max caps the naive candidates per request, never above `candidates`
    ids=["naive-subset", "naive-all"],
)
def test_bench_line_at_a_tiny_size(candidates: int, requests: int, naive_max: int, n_naive: int) -> None:
    line = bench_dcat(seq_len=16, candidates=candidates, requests=requests, naive_max=naive_max, **TINY)
    assert LINE_FIELDS <= set(line), LINE_FIELDS - set(line)
    assert line["bench"] == "dcat" and line["seq_len"] == 16
    assert (line["candidates"], line["requests"]) == (candidates, requests)
    assert (line["d_model"], line["n_layers"], line["n_heads"]) == (32, 1, 4)
    assert line["device"].startswith("cpu") and line["dtype"] == "fp32" and line["crossing_attention"] == "fused"
    assert line["reps"] == {"dcat": 1, "naive": 1}

    seq = line["seq_module"]  # the backbone's candidate hidden states
    assert seq["naive_candidates"] == requests * n_naive
    assert_consistent(seq, requests * candidates, requests * n_naive)
    ranker = line["ranker"]  # the whole early-fusion ranker, DCAT vs naive, same weights
    assert_consistent(ranker, requests * candidates, requests * n_naive)
    assert line["ratio"] == ranker["ratio"]  # judged by the whole ranker
    assert line["ranker_sequence"] == "hybrid"  # the default ranker, scored with a precomputed user embedding
    # the whole ranker against its sequence part, DCAT on both
    assert (line["ranker_cands_per_s"], line["seq_module_cands_per_s"]) == (
        ranker["dcat_cands_per_s"],
        seq["dcat_cands_per_s"],
    )
    want = line["ranker_cands_per_s"] / line["seq_module_cands_per_s"]
    assert line["ranker_vs_seq_module"] == pytest.approx(want, abs=5e-4)
    assert json.loads(json.dumps(line)) == line  # one JSON line, nothing lost on the way


def test_naive_max_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="naive_max must be ≥ 1"):
        bench_dcat(seq_len=8, candidates=4, requests=1, naive_max=0, **TINY)
    with pytest.raises(ValueError, match="sequence must be one of"):
        bench_dcat(seq_len=8, candidates=4, requests=1, sequence="pinfm_late", **TINY)


def test_the_folded_head_and_the_modules_agree_at_many_candidates() -> None:
    """From FOLD_MIN_CANDIDATES on the ranker's head is folded; max_abs_diff compares it with the plain modules."""
    line = bench_dcat(seq_len=8, candidates=40, requests=1, naive_max=40, **TINY)
    assert 0 <= line["ranker"]["max_abs_diff"] < 1e-4
    assert bench_dcat(seq_len=8, candidates=4, requests=1, sequence="pinfm_early", **TINY)["ranker_sequence"] == (
        "pinfm_early"
    )


def test_compiled_sequence_module_matches_eager() -> None:
    line = bench_dcat(seq_len=8, candidates=4, requests=1, naive_max=2, compile=True, **TINY)
    comp = line["seq_module_compiled"]
    assert {"candidates_per_s", "eager_candidates_per_s", "speedup_vs_eager", "max_abs_diff_vs_eager"} <= set(comp)
    assert comp["compile_seconds"] >= 0
    # speedup = compiled ÷ eager candidates/s (both rounded to 1 decimal, the speedup to 2)
    lo, hi = _quotient_bounds(comp["candidates_per_s"], 0.05, comp["eager_candidates_per_s"], 0.05)
    assert lo - 0.005 - 1e-9 <= comp["speedup_vs_eager"] <= hi + 0.005 + 1e-9, (comp, lo, hi)
    assert 0 <= comp["max_abs_diff_vs_eager"] < 1e-4  # inductor's kernels give the eager numbers
    assert "seq_module_compiled" not in bench_dcat(seq_len=8, candidates=4, requests=1, naive_max=2, **TINY)
