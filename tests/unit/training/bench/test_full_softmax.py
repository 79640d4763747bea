"""``afm bench full-softmax``: every fast path agrees with the plain autograd one (small sizes)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from afm.cli import cli
from training.bench.full_softmax import PATHS, bench_full_softmax


def test_bench_line_has_every_path_and_their_agreement() -> None:
    line = bench_full_softmax(queries=40, items=700, dim=16, reps=1, device="cpu")
    assert line["bench"] == "full-softmax" and line["ratio"] > 0
    for name, bf16, _ in PATHS:
        assert line[f"{name}_s"] > 0
        assert line[f"{name}_grad_rel_err"] < (2e-2 if bf16 else 1e-5), (name, line)
    assert line["default_path"] in {name for name, _, _ in PATHS}


def test_cli_prints_one_json_line() -> None:
    res = CliRunner().invoke(
        cli,
        ["bench", "full-softmax", "--queries", "8", "--items", "100", "--dim", "8", "--reps", "1", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["items"] == 100
