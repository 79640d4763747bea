"""The demo path at tiny size: synthetic world → four DAGs (airflow dags test) → service ranks a known user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

from afm.demo import pick_request, start_service
from features.config import Layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, str]:
    home = tmp_path_factory.mktemp("afm-demo")
    afm = str(Path(sys.executable).with_name("afm"))
    env = {**os.environ, "AFM_HOME": str(home)}
    proc = subprocess.run(
        [afm, "demo", "--size", "tiny"], env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert proc.returncode == 0, f"afm demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return Layout(home), proc.stdout


def test_demo_prints_ranking_and_auc_beside_best(demo_home) -> None:
    _, out = demo_home
    assert "POST http://127.0.0.1:" in out
    assert "per-action AUC" in out and "best the generator allows" in out
    assert "where to look next:" in out
    assert "GX gate (rows in = valid + quarantined):" in out


def test_gate_quarantined_exactly_the_planted_dirty_rows(demo_home) -> None:
    import json

    from features.synth import DIRTY_KINDS, SynthConfig

    layout, _ = demo_home
    planted = SynthConfig.preset("tiny").dirty_rows_per_day
    for ds in layout.available_days(layout.raw_events):
        gate = json.loads((layout.partition(layout.reports, ds) / "gate.json").read_text())
        assert gate["rows_in"] == gate["rows_valid"] + gate["rows_quarantined"]
        assert gate["rows_quarantined"] == planted
        assert set(gate["by_reason"]) == set(DIRTY_KINDS)
        assert len(pd.read_parquet(layout.partition(layout.quarantine_events, ds))) == planted


def test_every_dag_left_its_outputs(demo_home) -> None:
    layout, _ = demo_home
    days = layout.available_days(layout.raw_events)
    for table in (layout.valid_events, layout.user_sequences, layout.ranking_examples, layout.pretrain_corpus):
        assert layout.available_days(table) == days, table
    assert any((layout.models / "pinfm").iterdir())
    assert (layout.models / "ranker" / "CURRENT").read_text().strip()


def test_service_ranks_candidates_for_a_known_user(demo_home) -> None:
    layout, _ = demo_home
    days = layout.available_days(layout.raw_events)
    req = pick_request(layout, days[-1])
    current = (layout.models / "ranker" / "CURRENT").read_text().strip()
    proc, url = start_service(layout)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        resp = httpx.post(
            f"{url}/v1/rank",
            json={"user_id": req["user_id"], "candidates": req["candidates"], "surface": req["surface"]},
            timeout=30,
        )
        bad = httpx.post(f"{url}/v1/rank", json={"user_id": req["user_id"], "candidates": []}, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == current
    assert current in str(health)
    # the embedding published by publish_serving for this version is the one used
    assert body["embedding_source"] == "precomputed"
    assert sorted(i["item_id"] for i in body["items"]) == sorted(req["candidates"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= p <= 1.0 for i in body["items"] for p in i["scores"].values())
    assert bad.status_code == 422


def test_rerunning_a_day_through_the_dag_step_is_identical(demo_home) -> None:
    layout, _ = demo_home
    ds = layout.available_days(layout.raw_events)[-1]
    before = pd.read_parquet(layout.partition(layout.ranking_examples, ds))
    afm = str(Path(sys.executable).with_name("afm"))
    subprocess.run([afm, "features", "run-day", "--ds", ds, "--home", str(layout.root)], check=True, timeout=600)
    after = pd.read_parquet(layout.partition(layout.ranking_examples, ds))
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_bench_serving_loads_the_service_and_rolls_a_model_out_under_load(demo_home, store, tmp_path) -> None:
    """``afm bench serving`` on the demo world: a line per concurrency, the drill without a failed request."""
    import json

    layout, _ = demo_home
    current = (layout.models / "ranker" / "CURRENT").read_text().strip()
    afm = str(Path(sys.executable).with_name("afm"))
    out = tmp_path / "serving.jsonl"
    cmd = [afm, "bench", "serving", "--world", str(layout.root), "--store", store, "--candidates", "40",
           "--concurrency", "1,3", "--seconds", "3", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    runs, drill = lines[:-1], lines[-1]
    assert [r["concurrency"] for r in runs] == [1, 3]
    for r in runs:
        assert r["store"] == store and r["errors"] == 0 and r["requests"] > 5, r
        assert 0 < r["model_ms_p50"] < r["p50_ms"] <= r["p99_ms"], r  # the model's time is inside the request's
        assert 0 < r["overhead_share"] < 1 and r["features_ms_p50"] > 0
        assert r["candidates_per_s"] == pytest.approx(r["rps"] * 40, rel=1e-3)
        assert r["ratio"] == pytest.approx(r["candidates_per_s"] / r["offline_candidates_per_s"], rel=1e-2)
        assert r["raw_read_ms_p50"] > 0 and r["fetch_overhead_ratio"] > 0
        assert r["precomputed_share"] == 1.0, r  # the published embeddings of the served version are read
        assert Path(r["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert set(r["meets"]) >= {"fetch_overhead_ratio", "errors"} and r["meets"]["errors"]
        assert ("p99_ms" in r["meets"]) == ("overhead_share" in r["meets"]) == (r["concurrency"] == 1)
        assert r["served_read_ms_p50"] > 0 and r["sdk_read_ms_p50"] > 0
    assert drill["bench"] == "serving_rollout" and drill["errors"] == 0, drill
    assert drill["old_version"] == current != drill["new_version"]
    assert drill["answers_old"] > 0 and drill["answers_new"] > 0 and drill["answers_other"] == 0
    assert drill["wrong_before_reload"] == 0 and drill["wrong_after_reload"] == 0
    assert (layout.models / "ranker" / "CURRENT").read_text().strip() == current  # the drill restored it
